"""Teacher–student agreement metrics, logged for every run (docs/methods.md §2, last paragraph).

RLKD (Peng & Zhang, COLING 2025, arXiv 2409.12545) measures how well a student reproduces the
teacher's ranking of its peak tokens with two numbers, both computed here per position:

- top-5 consistency rate: the student's top-5 index list equals the teacher's, in the same order;
- top-20 mean overlap: abs(top-20(p) ∩ top-20(q)) / 20.

plus top-1 agreement (argmax equality). Every function takes ``(student_logits, teacher_logits,
mask=None)`` with logits (B, T, V) and mask (B, T) (True where a token counts; None = all) and
returns float values (B, T), 0 at masked positions. k is clamped to V. Ties inside a top-k are
broken the way ``torch.topk`` breaks them. Ranks are taken on logits: softmax is monotone, so they
equal the ranks of p and q.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def _masked(values: Tensor, mask: Tensor | None) -> Tensor:
    values = values.float()
    if mask is None:
        return values
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def _topk_indices(logits: Tensor, k: int) -> Tensor:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return logits.detach().topk(min(k, logits.shape[-1]), dim=-1).indices  # sorted, largest first


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """1.0 where argmax q == argmax p."""
    same = _topk_indices(student_logits, 1) == _topk_indices(teacher_logits, 1)
    return _masked(same.squeeze(-1), mask)


def topk_consistency(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, k: int = 5) -> Tensor:
    """1.0 where the student's top-k index list equals the teacher's in the same order (RLKD's
    "consistency rate")."""
    same = _topk_indices(student_logits, k) == _topk_indices(teacher_logits, k)
    return _masked(same.all(-1), mask)


def topk_overlap(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, k: int = 20) -> Tensor:
    """abs(top-k(p) ∩ top-k(q)) / k, with k clamped to V (RLKD's "mean overlap")."""
    s_idx, t_idx = _topk_indices(student_logits, k), _topk_indices(teacher_logits, k)
    # indices within one top-k list are distinct, so counting matches counts the intersection
    common = (s_idx[..., :, None] == t_idx[..., None, :]).any(-1).sum(-1)
    return _masked(common / s_idx.shape[-1], mask)


class AgreementMetrics(Metric):
    """Averages of the three agreement metrics over every valid position seen across updates.

    ``compute()`` returns {"top1_agreement", "top{consistency_k}_consistency",
    "top{overlap_k}_overlap"} (defaults: top5_consistency, top20_overlap); 0 before any valid
    position. Sums and the count are reduced with "sum" across processes, so the average is over
    all positions of all ranks.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, consistency_k: int = 5, overlap_k: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.consistency_k = consistency_k
        self.overlap_k = overlap_k
        # Integer counts: exact at any scale, and int64 works on every device (float64 does not on
        # MPS). The overlap is kept as abs(intersection) and its own denominator k·count, since k is
        # clamped to V only once logits are seen.
        for name in ("top1_hits", "consistency_hits", "overlap_hits", "overlap_slots", "count"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> None:
        if mask is None:
            mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
        mask = mask.bool()
        k = min(self.overlap_k, student_logits.shape[-1])
        count = mask.sum()
        consistency = topk_consistency(student_logits, teacher_logits, mask, self.consistency_k)
        self.top1_hits += top1_agreement(student_logits, teacher_logits, mask).sum().round().long()
        self.consistency_hits += consistency.sum().round().long()
        self.overlap_hits += (topk_overlap(student_logits, teacher_logits, mask, k) * k).sum().round().long()
        self.overlap_slots += count * k
        self.count += count

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp(min=1).float()
        return {
            "top1_agreement": self.top1_hits.float() / count,
            f"top{self.consistency_k}_consistency": self.consistency_hits.float() / count,
            f"top{self.overlap_k}_overlap": self.overlap_hits.float() / self.overlap_slots.clamp(min=1).float(),
        }
