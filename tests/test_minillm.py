"""MiniLLM (docs/methods.md §3): rewards, returns, importance weights and the clipped surrogate by hand;
the estimator's gradient against the exact gradient of the sequence-level reverse KL; tiny runs."""

import contextlib
import csv
import itertools
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig

from kdlab.losses.base import IGNORE_INDEX, KDBatch, RolloutKDBatch, RolloutSettings, masked_mean
from kdlab.losses.divergences import forward_kl
from kdlab.losses.minillm import (
    MiniLLM,
    clipped_surrogate,
    importance_weights,
    long_term_returns,
    token_rewards,
    whiten,
)
from kdlab.models import from_config
from kdlab.rollout import sample
from kdlab.train import run
from tests.conftest import CONF_DIR

REWARDS = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 6.0, 9.0, 9.0, 9.0]])
MASK = torch.tensor([[True, True, True, True, False], [False, True, True, False, False]])


def test_returns_by_hand():
    # row 0: r = 1 2 3 4; row 1: r = 6 9 at positions 1, 2 (the 5 and the trailing 9s are masked)
    future = long_term_returns(REWARDS, MASK, length_normalize=False)
    assert future.tolist() == [[9, 7, 4, 0, 0], [0, 9, 0, 0, 0]]
    # Eq. 6: the mean of the remaining rewards (3 + 4)/2 etc.; 0 at the last token
    normed = long_term_returns(REWARDS, MASK)
    assert normed.tolist() == [[3, 3.5, 4, 0, 0], [0, 9, 0, 0, 0]]
    # the current step included (single-step off, or the authors' code), divided by the remaining tokens incl. t
    current = long_term_returns(REWARDS, MASK, include_current_step=True)
    assert current.tolist() == [[2.5, 3, 3.5, 4, 0], [0, 7.5, 9, 0, 0]]
    # discounting, γ = 0.5: R_t = r_t + γ R_{t+1}
    disc = long_term_returns(REWARDS, MASK, include_current_step=True, length_normalize=False, gamma=0.5)
    assert disc[0, :4].tolist() == [3.25, 4.5, 5, 4]
    disc_future = long_term_returns(REWARDS, MASK, length_normalize=False, gamma=0.5)
    assert disc_future[0, :4].tolist() == [4.5, 5, 4, 0]
    authors = long_term_returns(REWARDS, MASK, include_current_step=True, gamma=0.5)
    assert authors[0, :4].tolist() == pytest.approx([3.25 / 4, 4.5 / 3, 5 / 2, 4])


def test_rewards_scaling_and_clipping():
    teacher = torch.tensor([[-1.0, -2.0, -300.0]])
    old = torch.tensor([[-2.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True]])
    assert token_rewards(teacher, old, mask).tolist() == [[1.0, -1.0, -299.0]]
    # the authors' code: 2·(log p − log q_old), clipped to ±100
    assert token_rewards(teacher, old, mask, reward_scaling=0.5, reward_clip=100).tolist() == [[2.0, -2.0, -100.0]]
    assert token_rewards(teacher, old, ~mask).tolist() == [[0.0, 0.0, 0.0]]


def test_clipped_surrogate_by_hand():
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 5.0]])
    old = torch.zeros(1, 5)
    logprobs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0]])).requires_grad_()
    mask = torch.tensor([[True, True, True, True, False]])
    values, ratio = clipped_surrogate(logprobs, old, adv, torch.ones(1, 5), mask, clip_eps=0.2)
    # max(−Aρ, −A·clip(ρ)): clipped where the clip makes it larger (entries 0 and 3)
    assert values[0].tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8, 0.0])
    assert ratio[0].tolist() == pytest.approx([1.5, 1.5, 0.5, 0.5, 0.0])
    values.sum().backward()
    # d(−Aρ)/d log q = −Aρ where unclipped; 0 where clipped or masked
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 1.5, -0.5, 0.0, 0.0])
    # the importance weight multiplies the ratio: w = 2 at θ = θ_old gives ρ = 2
    _, ratio = clipped_surrogate(old, old, adv, torch.full((1, 5), 2.0), mask, clip_eps=None)
    assert ratio[0, :4].tolist() == [2.0] * 4
    unclipped, _ = clipped_surrogate(logprobs.detach(), old, adv, torch.ones(1, 5), mask, clip_eps=None)
    assert unclipped[0].tolist() == pytest.approx([-1.5, 1.5, -0.5, 0.5, 0.0])


def test_whitening_over_valid_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = whiten(values, mask)
    assert w[0, :3].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], rel=1e-6) and w[0, 3] == 0


class Fixed(torch.nn.Module):
    """A "language model" with the same next-token logits everywhere."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=None)


def test_importance_weights_of_teacher_mixed_samples():
    """w_t = q(y_t)/(α p(y_t) + (1−α) q(y_t)) for each drawn token, from the rollout's records."""
    zs, zt = torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.tensor([3.0, 0.0, 0.0, -2.0])
    q, p = zs.softmax(-1), zt.softmax(-1)
    r = sample(Fixed(zs), Fixed(zt), torch.ones(64, 1, dtype=torch.long), torch.ones(64, 1, dtype=torch.long), eos_token_id=9, pad_token_id=0, max_new_tokens=2, teacher_mix=0.2, use_cache=False, generator=torch.Generator().manual_seed(0))
    w = importance_weights(r.logp_student, r.logp_sample, r.response_mask)
    y = r.labels[r.response_mask]
    assert torch.allclose(w[r.response_mask], q[y] / (0.2 * p[y] + 0.8 * q[y]), atol=1e-5)
    assert (w[~r.response_mask] == 1).all()
    # tokens the teacher prefers are down-weighted, the student's favourites up-weighted
    assert (w[r.response_mask][y == 0] < 1).all() and (w[r.response_mask][y == 3] > 1).all()


# -- the estimator's gradient vs the exact gradient of the sequence-level reverse KL --------------

V, EOS, MAX_NEW, PROMPT = 4, 3, 3, 1  # tokens 0, 1, 2 and <eos> = 3; prompt "1"; up to 3 new tokens


def tiny_lm(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=16, initializer_range=0.8)
    return from_config(config).float()


def all_sequences():
    """Every continuation: stopped by <eos> or cut at MAX_NEW tokens (1 + 3 + 36 = 40)."""
    out = []
    for n in range(1, MAX_NEW + 1):
        for ys in itertools.product(range(V), repeat=n):
            if EOS not in ys[:-1] and (ys[-1] == EOS or n == MAX_NEW):
                out.append(list(ys))
    return out


def sequence_log_probs(model, sequences):
    """log q(y|x) of each whole continuation, by one right-padded forward pass."""
    width = 1 + MAX_NEW
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, ys in enumerate(sequences):
        ids[i, : 1 + len(ys)] = torch.tensor([PROMPT, *ys])
        mask[i, : 1 + len(ys)] = 1
        labels[i, : len(ys)] = torch.tensor(ys)
    logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    per_token = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels != IGNORE_INDEX, per_token, 0.0).sum(-1)


def estimator_gradient(student, teacher, loss, n, generator):
    """One batch of n rollouts → the loss's gradient, reduced per sequence (num_tokens = n)."""
    prompts = torch.full((n, 1), PROMPT)
    r = sample(student, teacher, prompts, torch.ones_like(prompts), eos_token_id=EOS, pad_token_id=0, max_new_tokens=MAX_NEW, generator=generator)
    inputs = r.model_inputs()
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    batch = RolloutKDBatch(
        student_logits=student(**inputs).logits,
        teacher_logits=teacher_logits,
        labels=r.labels,
        num_tokens=torch.tensor(float(n)),
        old_logprobs=r.logp_student,
        sample_logprobs=r.logp_sample,
        teacher_logprobs=r.logp_teacher,
    )
    grads = torch.autograd.grad(loss(batch).loss, list(student.parameters()))
    return torch.cat([g.flatten() for g in grads])


@contextlib.contextmanager
def one_thread():
    # tiny tensors gain nothing from threads, and on a loaded 2-core machine spinning OpenMP
    # threads made this 40x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gradient_estimates(loss, batches=32, n=2000):
    student, teacher = tiny_lm(0), tiny_lm(1)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with one_thread():
        return torch.stack([estimator_gradient(student, teacher, loss, n, g) for _ in range(batches)]).double()


def unbiased(**switches):
    return MiniLLM(length_normalize=False, clip_eps=None, lm_coef=0.0, rollout=RolloutSettings(teacher_mix=0.0), **switches)


@pytest.fixture(scope="module")
def exact_gradient():
    student, teacher = tiny_lm(0), tiny_lm(1)
    sequences = all_sequences()
    assert len(sequences) == 40
    log_q = sequence_log_probs(student, sequences).double()
    with torch.no_grad():
        log_p = sequence_log_probs(teacher, sequences).double()
    assert torch.allclose(log_q.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)  # a distribution
    kl = (log_q.exp() * (log_q - log_p)).sum()
    grads = torch.autograd.grad(kl, list(student.parameters()))
    return torch.cat([g.flatten() for g in grads]).double(), kl.item()


@pytest.fixture(scope="module")
def single_step_estimates():
    return gradient_estimates(unbiased(single_step=True))


def z_scores(estimates, exact):
    """Each of K batch estimates is a mean over n rollouts; their mean is compared with the exact
    gradient in standard errors, SE = (sample std over the K batches) / √K.

    Returns z per coordinate and z along two directions: the exact gradient (a wrong scale or
    normalisation shows there) and the estimates' first principal component (where their noise
    concentrates: one direction carries ~96 % of the variance here, so the coordinates are far
    from independent).
    """
    k = estimates.shape[0]
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(k)
    per_coordinate = (mean - exact).abs() / se.clamp(min=1e-12)
    directions = [exact / exact.norm(), torch.linalg.eigh(torch.cov(estimates.T)).eigenvectors[:, -1]]
    along = [((estimates @ u).mean() - exact @ u).abs() / ((estimates @ u).std() / math.sqrt(k)) for u in directions]
    return per_coordinate, torch.stack(along)


def test_estimator_gradient_matches_the_exact_reverse_kl_gradient(exact_gradient, single_step_estimates):
    """Single-step on, clipping and length normalisation off, α = 0 (docs/methods.md §3.1, paper Eq. 3),
    reduced per sequence: the mean of the estimates must be the exact ∇KL[q_θ‖p] of the whole
    sequences (all 40 enumerated).

    Tolerance: 5 SE per coordinate (d = 728; with K − 1 = 31 degrees of freedom the Bonferroni
    bound on a false alarm anywhere is 1.5 %, and the real rate is far lower since the coordinates
    move together), and 4 SE along the two directions of :func:`z_scores`. The seed is fixed.
    """
    exact, kl = exact_gradient
    assert kl > 0.1  # teacher and student differ: there is something to estimate
    per_coordinate, along = z_scores(single_step_estimates, exact)
    assert per_coordinate.max() <= 5 and along.max() <= 4, (per_coordinate.max(), along)
    # the test has power: the standard error is small against the gradient itself (≈ 1.5 % here)
    se = single_step_estimates.std(0) / math.sqrt(single_step_estimates.shape[0])
    assert se.norm() < 0.05 * exact.norm()

    # ... and it detects a biased estimator: the policy gradient of R_{t+1} without the single-step term
    per_coordinate, along = z_scores(gradient_estimates(unbiased(single_step=False, include_current_step=False), batches=8), exact)
    assert per_coordinate.max() > 50 and along.max() > 20


def test_without_single_step_is_unbiased_but_noisier(exact_gradient, single_step_estimates):
    """The ablation 'without single-step' (policy gradient on R_t, paper Eq. 2) is unbiased too; the
    decomposition's point is a lower variance (paper §2.2)."""
    exact, _ = exact_gradient
    plain = gradient_estimates(unbiased(single_step=False))
    per_coordinate, along = z_scores(plain, exact)
    assert per_coordinate.max() <= 5 and along.max() <= 4, (per_coordinate.max(), along)
    assert single_step_estimates.std(0).norm() < plain.std(0).norm()


# -- the loss on a rollout batch ------------------------------------------------------------------


def rollout_batch(alpha=0.2, with_plain=True):
    student, teacher = tiny_lm(0), tiny_lm(1)
    prompts = torch.full((16, 1), PROMPT)
    r = sample(student, teacher, prompts, torch.ones_like(prompts), eos_token_id=EOS, pad_token_id=0, max_new_tokens=MAX_NEW, teacher_mix=alpha, generator=torch.Generator().manual_seed(1))
    inputs = r.model_inputs()
    plain = None
    if with_plain:
        ids = torch.tensor([[1, 2, 0, 3], [1, 1, 3, 0]])
        labels = torch.tensor([[2, 0, 3, IGNORE_INDEX], [1, 3, IGNORE_INDEX, IGNORE_INDEX]])
        plain = KDBatch(student_logits=student(input_ids=ids).logits, teacher_logits=teacher(input_ids=ids).logits.detach(), labels=labels)
    return RolloutKDBatch(
        student_logits=student(**inputs).logits,
        teacher_logits=teacher(**inputs).logits.detach(),
        labels=r.labels,
        old_logprobs=r.logp_student,
        sample_logprobs=r.logp_sample,
        teacher_logprobs=r.logp_teacher,
        plain=plain,
        stats={"gen_length": r.lengths.float().mean()},
    ), r


def test_unlabelled_positions_never_reach_the_loss():
    """Prompt and padding logits are not read: replacing them by NaN leaves loss and gradients unchanged."""
    batch, _ = rollout_batch(with_plain=False)
    student = batch.student_logits.detach().double().requires_grad_(True)
    poisoned = torch.where(batch.mask[..., None], student.detach(), torch.full_like(student, float("nan"))).requires_grad_(True)
    losses, grads = [], []
    for logits in (student, poisoned):
        out = MiniLLM(lm_coef=0.0)(replace(batch, student_logits=logits, teacher_logits=batch.teacher_logits.double()))
        (g,) = torch.autograd.grad(out.loss, logits)
        losses.append(out.loss)
        grads.append(torch.where(batch.mask[..., None], g, torch.zeros_like(g)))
    assert torch.isfinite(losses[1]) and torch.allclose(losses[0], losses[1], atol=1e-12)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)

    class SoftmaxRows(torch.overrides.TorchFunctionMode):
        """Records how many rows every softmax over the vocabulary sees."""

        rows: list[int] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("log_softmax", "softmax"):
                self.rows.append(args[0].numel() // args[0].shape[-1])
            return func(*args, **(kwargs or {}))

    with SoftmaxRows() as mode:
        MiniLLM(lm_coef=0.0)(batch)
    assert mode.rows and max(mode.rows) == int(batch.mask.sum()) < batch.mask.numel()


def test_loss_terms_and_logs_at_the_old_policy():
    batch, r = rollout_batch()
    out = MiniLLM()(batch)
    logs = out.logs
    assert {"pg", "single", "pt", "reward", "clip_frac", "iw_mean", "iw_max", "ratio_mean", "gen_length"} <= set(logs)
    assert out.loss.item() == pytest.approx(float(logs["pg"] + logs["single"] + logs["pt"]), rel=1e-5)
    # at θ = θ_old the ratio is the importance weight: ρ = w
    assert logs["ratio_mean"] == pytest.approx(float(logs["iw_mean"]), rel=1e-5)
    w = importance_weights(r.logp_student, r.logp_sample, r.response_mask)[r.response_mask]
    assert logs["iw_max"] == pytest.approx(float(w.max())) and logs["clip_frac"] == pytest.approx(float(((w - 1).abs() > 0.2).float().mean()))
    rewards = (r.logp_teacher - r.logp_student)[r.response_mask]
    assert logs["reward"] == pytest.approx(float(rewards.mean()), rel=1e-5)
    out.loss.backward()

    # switches: no single-step term; no PT term (and then no plain text needed); the authors' PT mix
    batch, _ = rollout_batch(with_plain=False)
    out = MiniLLM(single_step=False, lm_coef=0.0)(batch)
    assert "single" not in out.logs and "pt" not in out.logs and out.loss.item() == pytest.approx(float(out.logs["pg"]))
    assert not MiniLLM(lm_coef=0.0).needs.plain_text and MiniLLM(pt_kd_ratio=0.5).needs.plain_text_teacher
    batch, _ = rollout_batch()
    lm = MiniLLM()(batch).logs["pt"]
    plain = batch.plain
    fkl = masked_mean(forward_kl(plain.student_logits, plain.teacher_logits, plain.labels), plain.mask)
    assert MiniLLM(pt_kd_ratio=0.5)(batch).logs["pt"] == pytest.approx((0.5 * lm + 0.5 * fkl).item(), rel=1e-5)
    with pytest.raises(ValueError, match="trains on rollouts"):
        MiniLLM()(KDBatch(student_logits=batch.student_logits, teacher_logits=batch.teacher_logits, labels=batch.labels))
    with pytest.raises(ValueError, match="clip_eps"):
        MiniLLM(clip_eps=1.5)
    with pytest.raises(ValueError, match="fraction"):
        MiniLLM(rollout=RolloutSettings(fraction=0.5))


# -- end to end -----------------------------------------------------------------------------------


def train_logs(out_dir) -> dict[str, list[float]]:
    with open(next(Path(out_dir).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logs = {}
    for row in rows:
        for k, v in row.items():
            if v not in ("", None):
                logs.setdefault(k, []).append(float(v))
    return logs


def test_minillm_and_onpolicy_train_and_log(tiny_cfg):
    cfg = tiny_cfg("loss=minillm", "loss.rollout.mini_batch_size=8", "loss.rollout.epochs=2")
    metrics = run(cfg)
    assert all(math.isfinite(v) for v in metrics.values())
    logs = train_logs(cfg.paths.output_dir)
    for key in ("train/rev_kl", "train/reward", "train/clip_frac", "train/iw_mean", "train/iw_max", "train/gen_length", "train/pg", "train/single", "train/pt"):
        assert key in logs, key
    assert all(v >= 1 for v in logs["train/gen_length"])

    cfg = tiny_cfg("loss=onpolicy", "loss.lambda_onpolicy=0.5")
    cfg.paths.output_dir += "-onpolicy"
    run(cfg)
    logs = train_logs(cfg.paths.output_dir)
    assert logs["train/onpolicy"] == [0.0, 1.0] * 3  # λ = 0.5: every other step on student samples
    assert "train/rev_kl" in logs and "train/kd" in logs


def test_onpolicy_rejects_a_teacher_free_base():
    from kdlab.losses.onpolicy import OnPolicyKD

    with pytest.raises(ValueError, match="does not use the teacher"):
        OnPolicyKD(base="ce")
    with pytest.raises(ValueError, match="lambda_onpolicy"):
        OnPolicyKD(lambda_onpolicy=2.0)


def test_ablation_experiment_composes_each_variant():
    expected = {
        "full": (True, True, 0.2),
        "no_length_norm": (True, False, 0.2),
        "no_teacher_mix": (True, True, 0.0),
        "no_single_step": (False, True, 0.2),
    }
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for variant, (single, length, alpha) in expected.items():
            cfg = compose("train", overrides=["experiment=minillm_ablation", f"+ablation/minillm={variant}"], return_hydra_config=True)
            assert cfg.loss._target_.endswith("MiniLLM")
            assert (cfg.loss.single_step, cfg.loss.length_normalize, cfg.loss.rollout.teacher_mix) == (single, length, alpha), variant
        swept = cfg.hydra.sweeper.params["+ablation/minillm"]
        assert sorted(swept.split(",")) == sorted(expected)
