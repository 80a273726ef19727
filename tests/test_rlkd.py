"""RLKD (docs/methods.md §2) against independent float64 references and hand computations."""

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression

from kdlab.losses import rlkd
from kdlab.losses.base import IGNORE_INDEX, KDBatch, masked_mean
from kdlab.losses.divergences import TokenKD, forward_kl
from kdlab.losses.rlkd import RankingKD, _masked_soft_rank, ranking_loss_per_token
from kdlab.losses.softrank import soft_rank

# ---------- an independent reference: numpy + scikit-learn, one position at a time ----------


def _ref_soft_rank(x: np.ndarray, eps: float) -> np.ndarray:
    n = len(x)
    z = x / eps
    order = np.argsort(-z, kind="stable")
    v = IsotonicRegression(increasing=False).fit_transform(np.arange(n), z[order] - np.arange(n, 0, -1))
    out = np.empty(n)
    out[order] = z[order] - v
    return out


def _ref_loss(s: np.ndarray, t: np.ndarray, k: int, eps: float, rank_logits: bool, dedupe: bool) -> float:
    k = min(k, len(t))
    t_top, s_top = list(np.argsort(-t)[:k]), list(np.argsort(-s)[:k])
    union = t_top + [i for i in s_top if i not in t_top] if dedupe else t_top + s_top
    vs, vt = (s, t) if rank_logits else (softmax(s), softmax(t))
    rs, rt = _ref_soft_rank(vs[union], eps), _ref_soft_rank(vt[union], eps)
    cs, ct = rs - rs.mean(), rt - rt.mean()
    if np.linalg.norm(cs) < 1e-12 or np.linalg.norm(ct) < 1e-12:
        return 1.0
    return 1.0 - float(cs @ ct / (np.linalg.norm(cs) * np.linalg.norm(ct)))


def _random_pair(shape=(3, 4, 12), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2, torch.randn(*shape, generator=g, dtype=dtype) * 2


def _batch(student, teacher, labels=None, num_tokens=None):
    if labels is None:
        labels = torch.zeros(student.shape[:-1], dtype=torch.long)
    return KDBatch(student_logits=student, teacher_logits=teacher, labels=labels, num_tokens=num_tokens)


# ---------- the per-token ranking loss ----------


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("eps", [1.0, 0.1])
@pytest.mark.parametrize("rank_logits", [False, True])
@pytest.mark.parametrize("dedupe", [True, False])
def test_matches_reference(k, eps, rank_logits, dedupe):
    """Covers the padded-vs-unpadded equivalence: the reference ranks the de-duplicated set alone."""
    s, t = _random_pair(seed=k)
    kw = {"k": k, "regularization_strength": eps, "rank_logits": rank_logits, "dedupe_union": dedupe}
    got = ranking_loss_per_token(s, t, None, **kw)
    ref = [
        [_ref_loss(s[b, i].numpy(), t[b, i].numpy(), k, eps, rank_logits, dedupe) for i in range(4)] for b in range(3)
    ]
    np.testing.assert_allclose(got.numpy(), np.array(ref), atol=1e-6)


def test_tiny_strength_is_scipy_spearman_on_logits():
    s, t = _random_pair(shape=(1, 6, 30), seed=3)
    got = ranking_loss_per_token(s, t, None, k=6, regularization_strength=1e-6, rank_logits=True, dedupe_union=True)
    for i in range(6):
        ts, ss = t[0, i].numpy(), s[0, i].numpy()
        t_top = list(np.argsort(-ts)[:6])
        union = t_top + [j for j in np.argsort(-ss)[:6] if j not in t_top]
        assert got[0, i].item() == pytest.approx(1 - spearmanr(ts[union], ss[union]).statistic, abs=1e-6)


def test_default_is_pearson_of_probabilities():
    """Probabilities at strength 1 lie within 1 of each other: the soft rank is p + const, so ρ is
    the Pearson correlation of p and q over S (see the module docstring)."""
    s, t = _random_pair(shape=(1, 5, 10), seed=4)
    got = ranking_loss_per_token(s, t, None)  # k=5, probabilities, strength 1, de-duplicated
    for i in range(5):
        ss, ts = s[0, i].numpy(), t[0, i].numpy()
        t_top = list(np.argsort(-ts)[:5])
        union = t_top + [j for j in np.argsort(-ss)[:5] if j not in t_top]
        pearson = np.corrcoef(softmax(ss)[union], softmax(ts)[union])[0, 1]
        assert got[0, i].item() == pytest.approx(1 - pearson, abs=1e-6)


# teacher top-2 = {0, 1}, student top-2 = {1, 2}: token 1 is in both lists
HAND_T = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]])
HAND_S = torch.tensor([[[0.0, 3.0, 2.0, 1.0]]])


def test_union_by_hand_dedupe_vs_concatenation():
    kw = {"k": 2, "regularization_strength": 1e-4, "rank_logits": True}
    # S = {0,1,2}: teacher ranks (3,2,1), student (1,3,2); centred (1,0,-1)·(-1,1,0) / 2 = -1/2
    assert ranking_loss_per_token(HAND_S, HAND_T, None, dedupe_union=True, **kw).item() == pytest.approx(1.5, abs=1e-4)
    # S = [0,1,1,2]: token 1 twice, tied: teacher (4,2.5,2.5,1), student (1,3.5,3.5,2);
    # centred (1.5,0,0,-1.5)·(-1.5,1,1,-0.5) = -1.5, norms² 4.5 and 4.5: ρ = -1/3
    concatenated = ranking_loss_per_token(HAND_S, HAND_T, None, dedupe_union=False, **kw)
    assert concatenated.item() == pytest.approx(4 / 3, abs=1e-4)


def test_padding_shifts_valid_soft_ranks_by_the_pad_count():
    """The claim behind the fixed-width union (proof in _masked_soft_rank's docstring)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    valid = torch.rand(50, 8, generator=g) > 0.4
    valid[:, 0] = True
    for eps in (0.1, 1.0, 5.0):
        padded = _masked_soft_rank(x, valid, eps)
        for row in range(50):
            m = int((~valid[row]).sum())
            alone = soft_rank(x[row][valid[row]], eps)
            torch.testing.assert_close(padded[row][valid[row]], alone + m)


@pytest.mark.parametrize("switches", [{}, {"rank_logits": True}, {"dedupe_union": False}, {"k": 12}])
def test_identical_student_and_teacher_give_zero(switches):
    _, t = _random_pair(seed=6)
    assert ranking_loss_per_token(t.clone(), t, None, **switches).abs().max().item() < 1e-9


def test_reversed_order_gives_rho_minus_one():
    _, t = _random_pair(shape=(2, 3, 7), seed=7)
    got = ranking_loss_per_token(-t, t, None, k=7, regularization_strength=1e-4, rank_logits=True)
    torch.testing.assert_close(got, torch.full_like(got, 2.0), atol=1e-4, rtol=0)
    assert (ranking_loss_per_token(-t, t, None, k=7) > 1.0).all()  # probabilities: strongly anti-correlated


def test_k_at_least_vocab_is_clamped_to_the_whole_vocabulary():
    s, t = _random_pair(shape=(2, 3, 6), seed=8)
    for dedupe in (True, False):
        big = ranking_loss_per_token(s, t, None, k=50, dedupe_union=dedupe)
        torch.testing.assert_close(big, ranking_loss_per_token(s, t, None, k=6, dedupe_union=dedupe))
        ref = [[_ref_loss(s[b, i].numpy(), t[b, i].numpy(), 6, 1.0, False, dedupe) for i in range(3)] for b in range(2)]
        np.testing.assert_allclose(big.numpy(), np.array(ref), atol=1e-6)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ranking_loss_per_token(s, t, None, k=0)


def test_constant_teacher_gives_rho_zero_without_nan():
    s = torch.randn(1, 2, 10, requires_grad=True)
    t = torch.zeros(1, 2, 10)  # every value equal: the centred soft ranks are 0
    loss = ranking_loss_per_token(s, t, None)
    assert loss.tolist() == [[1.0, 1.0]]
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_masked_positions_do_not_count():
    s, t = _random_pair(shape=(2, 5, 12), seed=9)
    labels = torch.tensor([[1, 1, IGNORE_INDEX, 1, IGNORE_INDEX], [IGNORE_INDEX, 1, 1, 1, 1]])
    masked = labels == IGNORE_INDEX
    s2, t2 = s.clone(), t.clone()
    s2[masked], t2[masked] = torch.randn(int(masked.sum()), 12, dtype=s.dtype), float("nan")
    a = ranking_loss_per_token(s, t, labels)
    b = ranking_loss_per_token(s2, t2, labels)
    torch.testing.assert_close(a, b)
    assert (a[masked] == 0).all() and (a[~masked] > 0).all()
    loss = RankingKD()
    changed = loss(_batch(s2, t.clone(), labels)).logs["L_rank"]
    torch.testing.assert_close(loss(_batch(s, t, labels)).logs["L_rank"], changed)


def test_all_masked_gives_zero_and_finite_zero_gradient():
    s, t = _random_pair(shape=(2, 3, 8), seed=10)
    s.requires_grad_()
    labels = torch.full((2, 3), IGNORE_INDEX)
    out = RankingKD()(_batch(s, t, labels))
    assert out.loss.item() == 0.0 and out.logs["L_rank"].item() == 0.0
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_gradient_reaches_the_student_only_and_is_finite():
    s, t = _random_pair(shape=(2, 3, 16), seed=11, dtype=torch.float32)
    s.requires_grad_(), t.requires_grad_()
    ranking_loss_per_token(s, t, None).sum().backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("rank_logits", [False, True])
def test_gradcheck(rank_logits):
    s, t = _random_pair(shape=(1, 2, 6), seed=12)
    s.requires_grad_()
    kw = {"k": 2, "rank_logits": rank_logits, "regularization_strength": 0.5}
    assert torch.autograd.gradcheck(lambda x: ranking_loss_per_token(x, t, None, **kw), (s,))


def test_bfloat16_logits_give_float32_values():
    s, t = _random_pair(shape=(2, 3, 16), seed=13, dtype=torch.bfloat16)
    got = ranking_loss_per_token(s, t, None)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


# ---------- RankingKD ----------


def test_default_is_two_rank_plus_forward_kl():
    s, t = _random_pair(seed=14, dtype=torch.float32)
    labels = torch.tensor([[1, 1, 1, IGNORE_INDEX]] * 3)
    batch = _batch(s, t, labels)
    loss = RankingKD()
    assert loss.k == 5 and loss.rank_weight == 2.0
    out = loss(batch)
    base = TokenKD(divergence=forward_kl)(batch)
    l_rank = masked_mean(ranking_loss_per_token(s, t, labels), batch.mask)
    torch.testing.assert_close(out.logs["L_rank"], l_rank)
    torch.testing.assert_close(out.logs["L_base"], base.loss)
    torch.testing.assert_close(out.logs["kd"], base.logs["kd"])  # the base's own logs pass through
    torch.testing.assert_close(out.loss, 2 * l_rank + base.loss)
    torch.testing.assert_close(masked_mean(out.per_token, batch.mask), out.loss)


def test_callable_base_and_num_tokens():
    s, t = _random_pair(seed=15, dtype=torch.float32)
    batch = _batch(s, t, num_tokens=torch.tensor(24))  # twice the 12 local tokens
    out = RankingKD(base=TokenKD(divergence=forward_kl))(batch)
    local = ranking_loss_per_token(s, t, None).mean()
    torch.testing.assert_close(out.logs["L_rank"], local / 2)


@pytest.mark.parametrize("base", [None, "none"])
def test_ranking_alone(base):
    s, t = _random_pair(seed=16, dtype=torch.float32, shape=(2, 3, 40))
    loss = RankingKD(base=base)
    assert loss.k == 15 and loss.rank_weight == 1.0
    out = loss(_batch(s, t))
    torch.testing.assert_close(out.loss, ranking_loss_per_token(s, t, None, k=15).mean())
    assert set(out.logs) == {"L_rank"}
    assert RankingKD(base=None, k=3, rank_weight=2.0).k == 3


def test_switches_change_the_value():
    s, t = _random_pair(seed=17, dtype=torch.float32)
    batch = _batch(s, t)
    default = RankingKD()(batch).loss
    switches = (
        {"rank_logits": True},
        {"dedupe_union": False},
        {"dynamic_weighting": True},
        {"authors_combination": True},
    )
    for switch in switches:
        assert not torch.allclose(RankingKD(**switch)(batch).loss, default), switch


def test_authors_combination_and_its_nan_fallback(monkeypatch):
    s, t = _random_pair(seed=18, dtype=torch.float32)
    batch = _batch(s, t)
    paper = RankingKD()(batch)
    out = RankingKD(authors_combination=True)(batch)
    torch.testing.assert_close(out.loss, out.logs["L_rank"] + out.logs["L_base"] / 2)
    torch.testing.assert_close(out.loss, paper.loss / 2)  # the paper's loss scaled by 1/2
    torch.testing.assert_close(masked_mean(out.per_token, batch.mask), out.loss)

    monkeypatch.setattr(rlkd, "ranking_loss_per_token", lambda s, *a, **kw: torch.full(s.shape[:-1], float("nan")))
    fallback = RankingKD(authors_combination=True)(batch)
    torch.testing.assert_close(fallback.loss, paper.logs["L_base"])
    assert torch.isnan(RankingKD()(batch).loss)  # the paper's combination has no such guard


def test_dynamic_weighting_by_hand():
    # k = 2. Position 0: both top-2 = {0, 1} → overlap 1; position 1: {0,1} vs {1,2} → 1/2
    t = torch.tensor([[[3.0, 2.0, 0.0, -1.0, -2.0, -3.0], [3.0, 2.0, 0.0, -1.0, -2.0, -3.0]]])
    s = torch.tensor([[[2.0, 3.0, 0.5, -1.0, -2.0, -3.0], [0.0, 3.0, 2.0, -1.0, -2.0, -3.0]]])
    for labels, weight in ((torch.tensor([[1, 1]]), 0.75), (torch.tensor([[IGNORE_INDEX, 1]]), 0.5)):
        out = RankingKD(k=2, dynamic_weighting=True)(_batch(s, t, labels))
        assert out.logs["base_weight"].item() == pytest.approx(weight)
        torch.testing.assert_close(out.loss, 2 * out.logs["L_rank"] + weight * out.logs["L_base"])


def test_built_by_hydra_and_errors():
    from hydra.utils import instantiate

    loss = instantiate({"_target_": "kdlab.losses.rlkd.RankingKD", "base": "tvd", "k": 3})
    s, t = _random_pair(seed=19, dtype=torch.float32)
    assert torch.isfinite(loss(_batch(s, t)).loss)
    with pytest.raises(ValueError, match="unknown loss"):
        RankingKD(base="no_such_loss")
    with pytest.raises(ValueError, match="need a base loss"):
        RankingKD(base=None, authors_combination=True)
    with pytest.raises(ValueError, match="teacher logits"):
        RankingKD()(KDBatch(student_logits=s, teacher_logits=None, labels=torch.zeros(3, 4, dtype=torch.long)))


def test_a_minus_inf_teacher_logit_among_the_ranked_tokens_ranks_last(rank_logits=True):
    """rank_logits=true: a −inf teacher logit in S (the student's top-k holds a masked id) once gave
    ρ = 0 and a NaN gradient; it ranks last, as its probability 0 does with rank_logits=false."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(1, 2, 12, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, 2, 12, generator=g, dtype=torch.float64)
    top = student.topk(3, dim=-1).indices
    teacher[0, 0, top[0, 0, 0]] = float("-inf")  # the student's favourite is masked in the teacher
    student.requires_grad_(True)
    per_token = ranking_loss_per_token(student, teacher, torch.tensor([[1, 2]]), k=3, rank_logits=True)
    per_token.sum().backward()
    assert torch.isfinite(per_token).all() and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # the masked id ranks as a finite logit 1 below the lowest other one in S (the teacher's and the student's top-3)
    s_ids = torch.cat([teacher[0, 0].topk(3).indices, top[0, 0]])
    finite = teacher[0, 0, s_ids][torch.isfinite(teacher[0, 0, s_ids])]
    low = teacher.clone()
    low[0, 0, top[0, 0, 0]] = finite.min() - 1.0
    expected = ranking_loss_per_token(student.detach(), low, torch.tensor([[1, 2]]), k=3, rank_logits=True)
    torch.testing.assert_close(per_token.detach(), expected)
