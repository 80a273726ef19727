"""kdlab.rollout: the mixed sampling distribution, left padding, <eos>, KV caches, the buffer's schedule."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from kdlab.data.suite import build_tokenizer
from kdlab.losses.base import IGNORE_INDEX, RolloutSettings
from kdlab.models import from_config
from kdlab.rollout import RolloutBuffer, plain_text_labels, sample, sampling_log_probs, token_logprobs


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny(tok, hidden, seed):
    torch.manual_seed(seed)
    # a large init spreads the logits, so samples vary and a position error would show
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32, initializer_range=0.3)
    return from_config(config, tok).eval()


@pytest.fixture(scope="module")
def pair(tok):
    return tiny(tok, 16, 0), tiny(tok, 32, 1)


def left_padded(rows, width, pad=0):
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 12]]


def run(pair, tok, ids, mask, seed=0, **kw):
    student, teacher = pair
    kw = {"max_new_tokens": 8, "teacher_mix": 0.2, **kw}
    g = torch.Generator().manual_seed(seed)
    return sample(student, teacher, ids, mask, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=g, **kw)


def test_mixed_distribution_and_filters_on_a_tiny_vocabulary():
    zs = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    zt = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    q, p = zs.softmax(-1), zt.softmax(-1)
    mixed = sampling_log_probs(zs, zt, teacher_mix=0.2).exp()
    assert torch.allclose(mixed, 0.2 * p + 0.8 * q, atol=1e-6)
    # α = 0 is the student exactly (importance weights exactly 1); α = 1 the teacher
    assert torch.equal(sampling_log_probs(zs, zt, teacher_mix=0.0), zs.log_softmax(-1))
    assert torch.allclose(sampling_log_probs(zs, zt, teacher_mix=1.0).exp(), p, atol=1e-6)
    # temperature applies to both before mixing
    mixed_t = sampling_log_probs(zs, zt, teacher_mix=0.5, temperature=2.0).exp()
    assert torch.allclose(mixed_t, 0.5 * (zt / 2).softmax(-1) + 0.5 * (zs / 2).softmax(-1), atol=1e-6)
    # top-k = 2 of the student alone: tokens 0 and 1, renormalised
    top2 = sampling_log_probs(zs, None, top_k=2).exp()
    assert torch.allclose(top2, torch.tensor([[q[0, 0], q[0, 1], 0, 0]]) / (q[0, 0] + q[0, 1]), atol=1e-6)
    # top-p: q = (.644, .237, .087, .032); p = 0.8 keeps the two whose mass reaches 0.8, p = 0.5 the first only
    assert torch.allclose(sampling_log_probs(zs, None, top_p=0.8).exp(), top2, atol=1e-6)
    assert torch.allclose(sampling_log_probs(zs, None, top_p=0.5).exp(), torch.tensor([[1.0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="needs the teacher"):
        sampling_log_probs(zs, None, teacher_mix=0.2)


def test_sampler_draws_from_the_mixture(tok):
    """Empirical frequencies of one step match α·p + (1−α)·q (chi-square-free: 5 standard errors)."""

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, **_):
            return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], input_ids.shape[1], -1), past_key_values=None)

    zs, zt = torch.tensor([2.0, 1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 3.0, 0.0])
    n = 20000
    ids, mask = torch.ones(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long)
    r = sample(Fixed(zs), Fixed(zt), ids, mask, eos_token_id=3, pad_token_id=0, max_new_tokens=1, teacher_mix=0.3, use_cache=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(r.sequences[:, 1], minlength=4).double() / n
    target = 0.3 * zt.softmax(-1).double() + 0.7 * zs.softmax(-1).double()
    assert ((freq - target).abs() <= 5 * (target * (1 - target) / n).sqrt()).all(), (freq, target)
    # recorded log-probs: sampling distribution, student, teacher, for each drawn token
    y = r.sequences[:, 1]
    assert torch.allclose(r.logp_sample[:, 0].double(), target.log()[y], atol=1e-5)
    assert torch.allclose(r.logp_student[:, 0], zs.log_softmax(-1)[y], atol=1e-6)
    assert torch.allclose(r.logp_teacher[:, 0], zt.log_softmax(-1)[y], atol=1e-6)


def test_left_padding_does_not_change_the_samples(pair, tok):
    """The same prompts padded to different widths give the same samples and log-probs (fixed seed).
    (That the log-probs are those of each prompt without padding: the next test.)"""
    a = run(pair, tok, *left_padded(PROMPTS, 6))
    b = run(pair, tok, *left_padded(PROMPTS, 10))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    for name in ("logp_sample", "logp_student", "logp_teacher"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name
    # the layout is a training batch's: right-padded prompt + response, nothing in front
    for i, prompt in enumerate(PROMPTS):
        assert a.sequences[i, : len(prompt)].tolist() == prompt
        assert a.attention_mask[i, : len(prompt) + int(a.lengths[i])].all() and not a.attention_mask[i, len(prompt) + int(a.lengths[i]) :].any()


def test_recorded_log_probs_equal_a_teacher_forced_forward(pair, tok):
    """The loss recomputes q_θ on the rollout layout (right-padded, so no position ids are needed and
    no padding precedes any token): it must reproduce the log-probs recorded under left padding."""
    student, teacher = pair
    r = run(pair, tok, *left_padded(PROMPTS, 7), teacher_mix=0.0)
    for model, recorded in ((student, r.logp_student), (teacher, r.logp_teacher)):
        logits = model(**r.model_inputs()).logits.log_softmax(-1)
        forced = logits.gather(-1, r.labels.clamp(min=0)[..., None]).squeeze(-1)
        assert torch.allclose(torch.where(r.response_mask, forced, 0.0), recorded, atol=1e-5)
    assert torch.equal(r.logp_sample, r.logp_student)  # α = 0: the student is the sampling distribution
    assert ((r.labels != IGNORE_INDEX) == r.response_mask).all()


def test_student_alone_sampling_scores_the_teacher_in_one_forward_as_stepping_would(pair, tok, monkeypatch):
    """α = 0: the teacher takes no part in sampling, so it no longer steps beside the student; one
    forward pass on the finished sequences gives the log-probs the stepping path recorded."""
    ids, mask = left_padded(PROMPTS, 7)
    stepped = run(pair, tok, ids, mask, teacher_mix=0.0, step_teacher=True)
    calls = []
    teacher = pair[1]
    original = type(teacher).forward
    monkeypatch.setattr(type(teacher), "forward", lambda self, *a, **k: calls.append(self is teacher) or original(self, *a, **k))
    scored = run(pair, tok, ids, mask, teacher_mix=0.0)
    assert sum(calls) == 1  # one teacher forward for the whole rollout (the student is another instance)
    assert torch.equal(scored.sequences, stepped.sequences) and torch.equal(scored.logp_student, stepped.logp_student)
    assert torch.allclose(scored.logp_teacher, stepped.logp_teacher, atol=1e-5)

    # the training step instead skips the scoring forward and takes the log-probs from its own
    # teacher forward on the same sequences (one teacher forward per on-policy step)
    calls.clear()
    unscored = run(pair, tok, ids, mask, teacher_mix=0.0, score_teacher=False)
    assert unscored.logp_teacher is None and sum(calls) == 0
    with torch.no_grad():
        teacher_logits = teacher(**unscored.model_inputs()).logits
    assert torch.allclose(token_logprobs(teacher_logits, unscored.labels), scored.logp_teacher, atol=1e-6)


def test_kv_cache_path_equals_no_cache_path(pair, tok):
    ids, mask = left_padded(PROMPTS, 7)
    cached = run(pair, tok, ids, mask, use_cache=True, temperature=0.8, top_k=20)
    plain = run(pair, tok, ids, mask, use_cache=False, temperature=0.8, top_k=20)
    assert torch.equal(cached.sequences, plain.sequences) and torch.equal(cached.response_mask, plain.response_mask)
    for name in ("logp_sample", "logp_student", "logp_teacher"):
        assert torch.allclose(getattr(cached, name), getattr(plain, name), atol=1e-5), name


def test_eos_stops_rows_pads_and_masks_them():
    """A toy LM: after token 3 it emits <eos> (4); otherwise 3 or 5 with equal probability."""

    class Toy(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False, **_):
            history = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
            last = history[:, -1]
            logits = torch.full((history.shape[0], 6), -1e4)
            logits[:, 3] = logits[:, 5] = 0.0
            logits[last == 3] = -1e4
            logits[last == 3, 4] = 0.0
            return SimpleNamespace(logits=logits[:, None].expand(-1, input_ids.shape[1], -1), past_key_values=history if use_cache else None)

    ids, mask = left_padded([[1, 2], [1], [1, 2, 2]], 3)
    r = sample(Toy(), None, ids, mask, eos_token_id=4, pad_token_id=0, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    assert r.logp_teacher is None
    prompt_len = mask.sum(-1)
    for i in range(3):
        n = int(r.lengths[i])
        resp = r.sequences[i, prompt_len[i] : prompt_len[i] + n].tolist()
        finished = 4 in resp
        if finished:  # <eos> is the last sampled token, right after the first 3, and counted
            assert resp[-1] == 4 and resp[-2] == 3 and resp.count(4) == 1 and resp.count(3) == 1
        else:
            assert n == 12 and set(resp) == {5}
        assert (r.sequences[i, prompt_len[i] + n :] == 0).all()  # padded after the end
        assert not r.attention_mask[i, prompt_len[i] + n :].any()
        assert r.response_mask[i].sum() == n and (r.logp_student[i][~r.response_mask[i]] == 0).all()
    # sampling stops as soon as every row has finished
    assert r.sequences.shape[1] == int((prompt_len + r.lengths).max())


def test_plain_text_labels_cover_every_real_token():
    ids = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    labels = plain_text_labels(ids, (ids != 0).long())
    assert labels.tolist() == [[5, 6, 2, -100, -100], [7, 2, -100, -100, -100]]


def fake_rollout(prompts):
    """Two sampled tokens per row, log q = 0 and log p = −1 on each (so Σ log q − log p = 2)."""
    from kdlab.rollout import Rollout

    seq = torch.cat([prompts, prompts[:, :2]], 1)
    response = torch.zeros_like(seq, dtype=torch.bool)
    response[:, prompts.shape[1] - 1 : -1] = True
    zeros = torch.zeros(seq.shape)
    return Rollout(seq, torch.ones_like(seq), response, zeros, zeros, torch.where(response, -1.0, 0.0))


def test_buffer_refreshes_serves_epochs_of_mini_batches_and_spreads_the_fraction():
    calls = []

    def sampler(prompts, mask, mix, score_teacher=True):
        calls.append((prompts.shape[0], mix))
        return fake_rollout(prompts)

    batch = {"prompt_ids": torch.arange(12).view(6, 2), "prompt_mask": torch.ones(6, 2, dtype=torch.long), "domain": torch.arange(6)}
    buffer = RolloutBuffer(RolloutSettings(num_rollouts=8, mini_batch_size=3, epochs=2, teacher_mix=0.2))
    served = [buffer.next(batch, sampler) for _ in range(7)]
    # 8 rollouts (the batch's 6 prompts, then 2 repeated) → mini-batches 3,3,2 × 2 epochs = 6 steps per refresh
    assert [len(r.sequences) for r in served] == [3, 3, 2, 3, 3, 2, 3]
    assert calls == [(8, 0.2), (8, 0.0), (8, 0.2), (8, 0.0)]  # α > 0: the student alone too, for rev_kl
    first_epoch = torch.cat([r.domain for r in served[:3]]).sort().values
    assert first_epoch.tolist() == [0, 0, 1, 1, 2, 3, 4, 5]  # every rollout once per epoch
    assert buffer.stats["rev_kl"] == pytest.approx(2.0) and buffer.stats["gen_length"] == pytest.approx(2.0)

    quarter = RolloutBuffer(RolloutSettings(fraction=0.25))
    on = [quarter.next(batch, sampler) is not None for _ in range(12)]
    assert sum(on) == 3 and on[3] and on[7] and on[11]
    assert [RolloutBuffer(RolloutSettings(fraction=f)).is_rollout_step(0) for f in (0.0, 1.0)] == [False, True]


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"teacher_mix=1.5.*top_k=-1"):
        RolloutSettings(teacher_mix=1.5, top_k=-1)
    assert math.isclose(RolloutSettings().fraction, 1.0)


def test_longest_prompt_finishing_first_keeps_every_row_aligned():
    """The row with the longest prompt emits <eos> at once while a short one runs to the limit:
    the trimmed width is then shorter than the sampled steps (a regression: an index error)."""

    class Toy(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False, **_):
            history = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
            logits = torch.full((history.shape[0], 6), -1e4)
            long_row = (history == 2).sum(-1) >= 2  # the long prompt holds two 2s
            logits[long_row, 4] = 0.0  # <eos>
            logits[~long_row, 5] = 0.0
            return SimpleNamespace(logits=logits[:, None].expand(-1, input_ids.shape[1], -1), past_key_values=history if use_cache else None)

    ids, mask = left_padded([[1, 2, 2, 2], [1]], 4)
    r = sample(Toy(), None, ids, mask, eos_token_id=4, pad_token_id=0, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    assert r.lengths.tolist() == [1, 3]
    assert r.sequences.tolist() == [[1, 2, 2, 2, 4], [1, 5, 5, 5, 0]]
    assert r.response_mask.sum(-1).tolist() == [1, 3]
