"""Token-level objectives (docs/methods.md §1) against float64 brute force on a tiny vocabulary."""

import math

import pytest
import torch
from hydra.utils import instantiate

from kdlab.losses import IGNORE_INDEX, KDBatch, masked_mean
from kdlab.losses import divergences as D
from kdlab.losses.divergences import loss_config

V = 5
PURE = {
    "fkl": D.forward_kl,
    "rkl": D.reverse_kl,
    "jsd": D.generalized_jsd,
    "skl": D.skew_forward_kl,
    "srkl": D.skew_reverse_kl,
    "tvd": D.total_variation,
}


def softmax_list(z, tau=1.0):
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def kl_list(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def brute(name, zs, zt, tau=1.0, beta=0.5, alpha=0.1):
    """The docs/methods.md formulas written out with Python floats, one position at a time."""
    q, p = softmax_list(zs, tau), softmax_list(zt, tau)
    if name == "fkl":
        return kl_list(p, q)
    if name == "rkl":
        return kl_list(q, p)
    if name == "jsd":
        m = mix(p, q, beta)
        return beta * kl_list(p, m) + (1 - beta) * kl_list(q, m)
    if name == "skl":
        return kl_list(p, mix(p, q, alpha))
    if name == "srkl":
        return kl_list(q, mix(q, p, alpha))
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    raise KeyError(name)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, V, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, 4]])
    return student, teacher, labels


@pytest.mark.parametrize("name", PURE)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_brute_force(name, tau, logits):
    student, teacher, labels = logits
    values = PURE[name](student, teacher, labels, temperature=tau)
    for b in range(2):
        for t in range(3):
            expected = 0.0 if labels[b, t] == IGNORE_INDEX else brute(name, student[b, t].tolist(), teacher[b, t].tolist(), tau)
            assert values[b, t].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", PURE)
def test_identical_inputs_give_zero_and_positive_otherwise(name, logits):
    student, teacher, _ = logits
    assert PURE[name](student, student.clone()).abs().max().item() < 1e-12
    assert (PURE[name](student, teacher) > 0).all()


def test_jsd_limits_and_symmetry(logits):
    student, teacher, _ = logits
    fkl, rkl = D.forward_kl(student, teacher), D.reverse_kl(student, teacher)
    assert torch.allclose(D.generalized_jsd(student, teacher, beta=0.0), fkl)
    assert torch.allclose(D.generalized_jsd(student, teacher, beta=1.0), rkl)
    # JSD(β)/β → KL(p‖q) as β → 0 and JSD(β)/(1−β) → KL(q‖p) as β → 1 (the end points above are these limits)
    eps = 1e-6
    assert torch.allclose(D.generalized_jsd(student, teacher, beta=eps) / eps, fkl, rtol=1e-4)
    assert torch.allclose(D.generalized_jsd(student, teacher, beta=1 - eps) / eps, rkl, rtol=1e-4)
    assert torch.allclose(D.generalized_jsd(student, teacher, beta=0.5), D.generalized_jsd(teacher, student, beta=0.5))
    assert (D.generalized_jsd(student, teacher, beta=0.5) <= math.log(2) + 1e-12).all()  # JSD is bounded by log 2


def test_skew_limits(logits):
    student, teacher, _ = logits
    assert torch.allclose(D.skew_forward_kl(student, teacher, alpha=0.0), D.forward_kl(student, teacher))
    assert torch.allclose(D.skew_reverse_kl(student, teacher, alpha=0.0), D.reverse_kl(student, teacher))
    # more skew → the target mixes in more of the first argument → a smaller divergence
    assert (D.skew_forward_kl(student, teacher, alpha=0.5) < D.skew_forward_kl(student, teacher, alpha=0.1)).all()
    with pytest.raises(ValueError, match="alpha"):
        D.skew_forward_kl(student, teacher, alpha=1.0)


def test_tvd_bounded_and_temperature_flattens(logits):
    student, teacher, _ = logits
    tvd = D.total_variation(student, teacher)
    assert ((tvd >= 0) & (tvd <= 1)).all()
    assert (D.forward_kl(student, teacher, temperature=100.0) < D.forward_kl(student, teacher)).all()


def test_teacher_minus_inf_logits_are_safe():
    """A padded vocabulary entry (-inf logit) has p = 0 and must contribute 0, not NaN."""
    student = torch.randn(1, 2, V, dtype=torch.float64)
    teacher = torch.randn(1, 2, V, dtype=torch.float64)
    teacher[..., -1] = float("-inf")
    for fn in (D.forward_kl, D.generalized_jsd, D.skew_forward_kl, D.total_variation):
        assert torch.isfinite(fn(student, teacher)).all()


@pytest.mark.parametrize("fn", [D.forward_kl, D.reverse_kl, D.generalized_jsd, D.skew_forward_kl, D.total_variation,
                                D.skew_reverse_kl, lambda s, t, y: D.skew_reverse_kl(s, t, y, alpha=0.0)])
def test_a_minus_inf_teacher_logit_at_a_masked_position_leaks_no_nan_gradient(fn, logits):
    """rkl (and srkl at α = 0) read log p where q > 0: an −inf at a masked row gave 0 · ∞ = NaN in backward."""
    student, teacher, labels = logits
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone()
    teacher[0, 2, 0] = float("-inf")  # position (0, 2) is masked
    values = fn(student, teacher, labels)
    masked_mean(values, labels != IGNORE_INDEX).backward()
    assert torch.isfinite(values).all() and torch.isfinite(student.grad).all()
    assert (student.grad[0, 2] == 0).all() and (student.grad[1, 1] == 0).all()  # masked rows get no gradient
    unmasked = fn(student.detach(), logits[1], labels)  # the valid positions' values are those of the untouched teacher
    torch.testing.assert_close(values.detach(), unmasked)


@pytest.mark.parametrize("name", PURE)
def test_gradcheck(name, logits):
    student, teacher, labels = logits
    student = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: PURE[name](s, teacher, labels, temperature=1.5), (student,))


def test_cross_entropy_matches_hand_value():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]], dtype=torch.float64))
    ce = D.cross_entropy(logits, torch.tensor([[0, IGNORE_INDEX]]))
    assert ce[0, 0].item() == pytest.approx(math.log(2))
    assert ce[0, 1].item() == 0.0


def test_masked_mean_all_masked_is_zero_with_finite_grad():
    values = torch.full((2, 3), float("nan"), requires_grad=True)
    out = masked_mean(values, torch.zeros(2, 3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(values.grad).all()
    v = torch.tensor([[1.0, 2.0, 3.0]])
    assert masked_mean(v, torch.tensor([[True, True, False]])).item() == pytest.approx(1.5)
    assert masked_mean(v, torch.tensor([[True, True, False]]), num_tokens=torch.tensor(6.0)).item() == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["ce", *PURE])
def test_loss_configs_build_and_reduce(name, logits):
    """Each kdlab/conf/loss file builds its callable; the reduction is the masked token mean."""
    student, teacher, labels = logits
    loss = D.load_loss(name)
    all_masked = KDBatch(student, teacher, torch.full_like(labels, IGNORE_INDEX))
    assert loss(all_masked).loss.item() == 0.0
    out = loss(KDBatch(student, teacher, labels))
    mask = labels != IGNORE_INDEX
    expected = out.per_token[mask].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_token_kd_temperature_scaling_and_ce_mix(logits):
    student, teacher, labels = logits
    batch = KDBatch(student, teacher, labels)
    divergence = D.forward_kl
    plain = D.TokenKD(divergence, temperature=2.0)(batch).loss
    scaled = D.TokenKD(divergence, temperature=2.0, scale_by_temperature_squared=True)(batch).loss
    assert scaled.item() == pytest.approx(4.0 * plain.item())
    mixed = D.TokenKD(divergence, ce_weight=0.5)(batch)
    ce = masked_mean(D.cross_entropy(student, labels), labels != IGNORE_INDEX)
    assert mixed.loss.item() == pytest.approx(mixed.logs["kd"].item() + 0.5 * ce.item())


def test_config_parameters_reach_the_function(logits):
    student, teacher, labels = logits
    cfg = loss_config("jsd")
    cfg.divergence.beta = 0.9
    out = instantiate(cfg)(KDBatch(student, teacher, labels))
    expected = D.generalized_jsd(student, teacher, labels, beta=0.9)
    assert torch.allclose(out.per_token, expected)


def test_unknown_loss_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss 'nope'.*fkl.*tvd"):
        D.load_loss("nope")
