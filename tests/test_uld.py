"""ULD's distance and the shared-vocabulary divergence (kdlab/losses/uld.py) against float64 brute force."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from kdlab.losses.divergences import forward_kl, generalized_jsd, reverse_kl, total_variation
from kdlab.losses.sparse import sparse_teacher
from kdlab.losses.uld import shared_vocab_divergence, uld_distance, uld_sparse_distance

NEG_INF = float("-inf")


def padded_reference(student_logits, teacher_logits, tau_s=1.0, tau_t=1.0):
    """The paper's recipe literally: softmax, sort descending, zero-pad the shorter, L1."""
    q = torch.softmax(student_logits.double() / tau_s, -1).sort(-1, descending=True).values
    p = torch.softmax(teacher_logits.double() / tau_t, -1).sort(-1, descending=True).values
    size = max(q.shape[-1], p.shape[-1])
    q, p = F.pad(q, (0, size - q.shape[-1])), F.pad(p, (0, size - p.shape[-1]))
    return (q - p).abs().sum(-1)


def coarsened_reference(student_logits, teacher_logits, k, tau_s=1.0, tau_t=1.0):
    """Σ_{i≤k} |q_(i) − p_(i)| + |Σ_{i>k} q_(i) − r| from the dense rows, the student zero-padded to k."""
    q = torch.softmax(student_logits.double() / tau_s, -1).sort(-1, descending=True).values
    p = torch.softmax(teacher_logits.double() / tau_t, -1).sort(-1, descending=True).values
    q = F.pad(q, (0, max(0, k - q.shape[-1])))
    return (q[..., :k] - p[..., :k]).abs().sum(-1) + (q[..., k:].sum(-1) - p[..., k:].sum(-1)).abs()


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


@pytest.mark.parametrize(
    "student, teacher, expected",
    [
        ([[0.6, 0.4]], [[0.5, 0.3, 0.2]], 0.1 + 0.1 + 0.2),
        ([[0.5, 0.3, 0.2]], [[0.6, 0.4]], 0.1 + 0.1 + 0.2),  # either side may be the longer
        ([[0.1, 0.6, 0.3]], [[0.3, 0.7]], 0.1 + 0.0 + 0.1),  # sorted before comparing
        ([[0.25, 0.25, 0.25, 0.25]], [[1.0]], 0.75 + 0.75),
    ],
)
def test_hand_computed_values(student, teacher, expected):
    d = uld_distance(logits_of(student), logits_of(teacher))
    assert d.shape == (1,)
    assert d.item() == pytest.approx(expected, abs=1e-12)


def test_invariant_to_permutations_of_either_vocabulary():
    torch.manual_seed(0)
    s, t = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    d = uld_distance(s, t)
    for _ in range(5):
        ps, pt = torch.randperm(7), torch.randperm(11)
        torch.testing.assert_close(uld_distance(s[:, ps], t), d, rtol=0, atol=1e-14)
        torch.testing.assert_close(uld_distance(s, t[:, pt]), d, rtol=0, atol=1e-14)
        torch.testing.assert_close(uld_distance(s[:, ps], t[:, pt]), d, rtol=0, atol=1e-14)
    assert (d > 0.05).all()  # the invariance is not that of a constant


def test_zero_when_the_sorted_vectors_agree():
    torch.manual_seed(1)
    s = torch.randn(4, 6, dtype=torch.float64)
    permuted = s[:, torch.randperm(6)] + 3.0  # a shift leaves the softmax unchanged
    assert uld_distance(s, permuted).abs().max().item() < 1e-15
    # a larger teacher vocabulary whose extra tokens have probability 0: still the same sorted vector
    wider = torch.cat([torch.full((4, 3), NEG_INF, dtype=torch.float64), permuted], dim=-1)
    assert uld_distance(s, wider).abs().max().item() < 1e-15
    assert uld_distance(wider, s).abs().max().item() < 1e-15


def test_at_most_the_l1_distance_of_any_pairing_and_equal_when_the_orders_agree():
    torch.manual_seed(2)
    s, t = torch.randn(200, 5, dtype=torch.float64), torch.randn(200, 5, dtype=torch.float64)
    d = uld_distance(s, t)
    l1 = 2 * total_variation(s, t)  # Σ|p − q| on the shared vocabulary, pairing token v with token v
    assert (d <= l1 + 1e-12).all() and (d < l1 - 1e-3).any()
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    for perm in itertools.permutations(range(5)):  # sorting minimises the L1 over every pairing
        assert (d <= (q - p[:, list(perm)]).abs().sum(-1) + 1e-12).all()
    # the teacher's values re-placed in the student's order: the identity pairing is the sorted one
    same_order = torch.empty_like(t).scatter_(-1, s.argsort(-1, descending=True), t.sort(-1, descending=True).values)
    torch.testing.assert_close(uld_distance(s, same_order), 2 * total_variation(s, same_order), rtol=0, atol=1e-14)


def test_padding_with_zero_probability_tokens_changes_nothing_and_matches_the_padded_reference():
    torch.manual_seed(3)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    d = uld_distance(s, t)
    torch.testing.assert_close(d, padded_reference(s, t), rtol=0, atol=1e-14)
    torch.testing.assert_close(uld_distance(t, s), padded_reference(t, s), rtol=0, atol=1e-14)
    for extra in (1, 5, 12):  # past the other side's size too, so the longer side switches
        pad = torch.full((5, extra), NEG_INF, dtype=torch.float64)
        torch.testing.assert_close(uld_distance(torch.cat([s, pad], -1), t), d, rtol=0, atol=1e-14)
        torch.testing.assert_close(uld_distance(s, torch.cat([pad, t], -1)), d, rtol=0, atol=1e-14)


def test_temperatures_divide_each_side_s_logits():
    torch.manual_seed(4)
    s, t = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    for tau_s, tau_t in ((2.0, 1.0), (1.0, 0.5), (3.0, 1.5)):
        d = uld_distance(s, t, student_temperature=tau_s, teacher_temperature=tau_t)
        torch.testing.assert_close(d, padded_reference(s / tau_s, t / tau_t), rtol=0, atol=1e-14)
        assert not torch.allclose(d, uld_distance(s, t))
    with pytest.raises(ValueError, match="student_temperature must be > 0"):
        uld_distance(s, t, student_temperature=0.0)
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        uld_distance(s, t, teacher_temperature=-1.0)


def test_half_precision_is_computed_in_float32_and_rows_must_match():
    torch.manual_seed(5)
    s, t = torch.randn(3, 6), torch.randn(3, 8)
    d = uld_distance(s.bfloat16(), t.bfloat16())
    assert d.dtype == torch.float32
    reference = padded_reference(s.bfloat16().float(), t.bfloat16().float())
    torch.testing.assert_close(d.double(), reference, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        uld_distance(s, t[:1])  # one teacher row would broadcast silently


def test_gradient_matches_finite_differences_and_reaches_the_student_only():
    torch.manual_seed(6)
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: uld_distance(x, t, student_temperature=1.5), (s,))
    uld_distance(s, t).sum().backward()
    assert t.grad is None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("vs, vt", [(9, 9), (6, 10), (12, 7)])
def test_sparse_with_the_whole_teacher_vocabulary_is_the_dense_distance(vs, vt):
    torch.manual_seed(7)
    s, t = torch.randn(5, vs, dtype=torch.float64), torch.randn(5, vt, dtype=torch.float64)
    for tau_s, tau_t in ((1.0, 1.0), (2.0, 0.5)):
        sparse = uld_sparse_distance(s, sparse_teacher(t, vt, temperature=tau_t), student_temperature=tau_s)
        dense = uld_distance(s, t, student_temperature=tau_s, teacher_temperature=tau_t)
        torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-14)


@pytest.mark.parametrize("vs, vt, k", [(10, 10, 3), (8, 12, 5), (15, 9, 4), (3, 10, 5), (1, 6, 2)])
def test_sparse_is_the_coarsened_distance_and_a_lower_bound_of_the_dense_one(vs, vt, k):
    torch.manual_seed(8)
    s, t = 2 * torch.randn(50, vs, dtype=torch.float64), 2 * torch.randn(50, vt, dtype=torch.float64)
    sparse = uld_sparse_distance(s, sparse_teacher(t, k), student_temperature=1.3)
    torch.testing.assert_close(sparse, coarsened_reference(s, t, k, tau_s=1.3), rtol=0, atol=1e-14)
    dense = uld_distance(s, t, student_temperature=1.3)
    assert (sparse <= dense + 1e-12).all()
    if vs > k:  # a strict bound somewhere: the ranks beyond k do not all differ in one direction
        assert (sparse < dense - 1e-6).any()


def test_sparse_gradient_matches_finite_differences():
    torch.manual_seed(9)
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    teacher = sparse_teacher(torch.randn(3, 9, dtype=torch.float64), 3)
    assert torch.autograd.gradcheck(lambda x: uld_sparse_distance(x, teacher), (s,))


@pytest.mark.parametrize("divergence", [forward_kl, reverse_kl, generalized_jsd, total_variation])
def test_shared_vocabulary_with_one_tokenizer_is_the_divergence_of_the_full_rows(divergence):
    torch.manual_seed(10)
    s, t = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    ids = torch.arange(8)
    d = shared_vocab_divergence(s, t, ids, ids, divergence, temperature=1.7)
    assert d.shape == (6,)
    assert torch.equal(d, divergence(s, t, None, temperature=1.7))


def test_shared_vocabulary_is_kl_between_the_renormalised_restrictions_in_any_column_order():
    torch.manual_seed(11)
    s, t = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    # student token 5 is teacher token 0, 0 is 9, 3 is 4, 6 is 2: the two vocabularies in different orders
    s_ids, t_ids = torch.tensor([5, 0, 3, 6]), torch.tensor([0, 9, 4, 2])
    q, p = torch.softmax(s[:, s_ids], -1), torch.softmax(t[:, t_ids], -1)  # renormalised over the shared tokens
    q, p = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)
    kl_pq, kl_qp = (p * (p / q).log()).sum(-1), (q * (q / p).log()).sum(-1)
    torch.testing.assert_close(shared_vocab_divergence(s, t, s_ids, t_ids, forward_kl), kl_pq, rtol=0, atol=1e-14)
    torch.testing.assert_close(shared_vocab_divergence(s, t, s_ids, t_ids, reverse_kl), kl_qp, rtol=0, atol=1e-14)
    perm = torch.randperm(4)  # listing the pairs in another order is the same correspondence
    reordered = shared_vocab_divergence(s, t, s_ids[perm], t_ids[perm], forward_kl)
    torch.testing.assert_close(reordered, kl_pq, rtol=0, atol=1e-14)
    # a different pairing of the same columns is a different correspondence and changes the value
    assert not torch.allclose(shared_vocab_divergence(s, t, s_ids, t_ids[[1, 2, 3, 0]], forward_kl), kl_pq)


def test_shared_vocabulary_refuses_mismatched_or_empty_id_lists():
    s, t = torch.randn(2, 5), torch.randn(2, 6)
    with pytest.raises(ValueError, match="two \\(S,\\) lists"):
        shared_vocab_divergence(s, t, torch.arange(3), torch.arange(4), forward_kl)
    with pytest.raises(ValueError, match="share no token"):
        shared_vocab_divergence(s, t, torch.arange(0), torch.arange(0), forward_kl)
