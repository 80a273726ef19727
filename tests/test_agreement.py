"""kdlab.agreement on logits whose top-k lists are known by hand."""

import pytest
import torch

from kdlab.agreement import AgreementMetrics, top1_agreement, topk_consistency, topk_overlap


def _logits_from_order(*orders: list[int], vocab: int = 8) -> torch.Tensor:
    """One position per order: the listed tokens get the highest logits in that order."""
    rows = []
    for order in orders:
        row = torch.zeros(vocab)
        for place, token in enumerate(order):
            row[token] = 10.0 - place
        rows.append(row)
    return torch.stack(rows)[None]  # (1, T, V)


# position 0: same top-3 in the same order; 1: same set, order swapped; 2: disjoint
TEACHER = _logits_from_order([0, 1, 2], [0, 1, 2], [0, 1, 2])
STUDENT = _logits_from_order([0, 1, 2], [1, 0, 2], [5, 6, 7])


def test_top1_agreement():
    assert top1_agreement(STUDENT, TEACHER).tolist() == [[1.0, 0.0, 0.0]]


def test_topk_consistency_needs_the_same_order():
    assert topk_consistency(STUDENT, TEACHER, k=3).tolist() == [[1.0, 0.0, 0.0]]
    assert topk_consistency(STUDENT, TEACHER, k=1).tolist() == [[1.0, 0.0, 0.0]]


def test_topk_overlap_ignores_order():
    assert topk_overlap(STUDENT, TEACHER, k=3).tolist() == [[1.0, 1.0, 0.0]]
    # k = 2: {0,1} vs {0,1}, {1,0}, {5,6}
    assert topk_overlap(STUDENT, TEACHER, k=2).tolist() == [[1.0, 1.0, 0.0]]
    # k = 4: {0,1,2,3} vs {0,1,4,5}
    partial = _logits_from_order([0, 1, 2, 3], vocab=8), _logits_from_order([0, 1, 4, 5], vocab=8)
    assert topk_overlap(*partial, k=4).tolist() == [[0.5]]


def test_mask_zeroes_positions():
    mask = torch.tensor([[True, False, True]])
    assert top1_agreement(STUDENT, TEACHER, mask).tolist() == [[1.0, 0.0, 0.0]]
    assert topk_overlap(STUDENT, TEACHER, mask, k=3).tolist() == [[1.0, 0.0, 0.0]]


def test_k_is_clamped_to_vocab():
    t = _logits_from_order([2, 0, 1], vocab=3)
    s = _logits_from_order([0, 2, 1], vocab=3)
    assert topk_overlap(s, t, k=20).tolist() == [[1.0]]  # k → 3: the whole vocabulary
    assert topk_consistency(s, t, k=20).tolist() == [[0.0]]
    assert topk_consistency(t, t, k=20).tolist() == [[1.0]]


def test_rejects_k_below_one():
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_overlap(STUDENT, TEACHER, k=0)


def test_metric_averages_valid_positions_across_updates():
    metric = AgreementMetrics(consistency_k=3, overlap_k=3)
    metric.update(STUDENT, TEACHER, torch.tensor([[True, True, False]]))  # pos 0, 1
    metric.update(STUDENT, TEACHER, torch.tensor([[False, False, True]]))  # pos 2
    metric.update(STUDENT, TEACHER, torch.tensor([[False, False, False]]))  # nothing
    out = metric.compute()
    assert set(out) == {"top1_agreement", "top3_consistency", "top3_overlap"}
    assert out["top1_agreement"].item() == pytest.approx(1 / 3)
    assert out["top3_consistency"].item() == pytest.approx(1 / 3)
    assert out["top3_overlap"].item() == pytest.approx(2 / 3)


def test_metric_default_names_and_empty_state():
    metric = AgreementMetrics()
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = metric.compute()
    assert set(out) == {"top1_agreement", "top5_consistency", "top20_overlap"}
    assert all(v.item() == 0.0 for v in out.values())  # no valid position yet: 0, not NaN
    metric.update(TEACHER, TEACHER)  # mask None: every position counts; V = 8 clamps k = 20
    assert all(v.item() == 1.0 for v in metric.compute().values())
    metric.reset()
    assert metric.count.item() == 0
