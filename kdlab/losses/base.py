"""The loss interface every kdlab objective implements (the README's "Adding a loss").

A loss is a plain callable built by Hydra from ``conf/loss/<name>.yaml``. The module hands it
one :class:`KDBatch` and logs what comes back in :class:`LossOutput`; a loss never logs itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kdlab.losses.sparse import SparseTeacher

IGNORE_INDEX = -100


@dataclass
class KDBatch:
    """What the module hands every loss.

    ``student_logits`` and ``teacher_logits`` are aligned with ``labels``: position t predicts
    ``labels[:, t]``. ``num_tokens`` is the normaliser of the shared masked reduction; the module
    sets it to the global count of valid tokens when training is data-parallel.
    ``teacher_sparse``: the teacher as its top-k plus a tail outcome (kdlab.losses.sparse), given
    instead of ``teacher_logits`` when the teacher cache is on (``teacher_cache.k``); objectives
    that accept it say so with ``accepts_sparse_teacher = True``.
    """

    student_logits: Tensor  # (B, T, V)
    teacher_logits: Tensor | None  # (B, T, V); None for losses that need no teacher
    labels: Tensor  # (B, T), IGNORE_INDEX where a token does not count
    domain: Tensor | None = None  # (B,) domain ids of the examples
    num_tokens: Tensor | None = None  # scalar normaliser; None means the local valid count
    teacher_sparse: SparseTeacher | None = None  # (B, T, k) views; then teacher_logits is None

    @property
    def mask(self) -> Tensor:
        return self.labels != IGNORE_INDEX


@dataclass
class LossOutput:
    loss: Tensor  # scalar to backpropagate
    logs: dict[str, Tensor] = field(default_factory=dict)  # logged as train/<name>
    per_token: Tensor | None = None  # (B, T) before reduction, for per-domain statistics


def masked_mean(values: Tensor, mask: Tensor, num_tokens: Tensor | None = None) -> Tensor:
    """The one masked reduction of kdlab (docs/methods.md §1).

    Sum of ``values`` over valid tokens divided by the number of valid tokens (or by
    ``num_tokens`` when a global count is given). Masked positions are selected out with
    ``torch.where`` rather than multiplied by zero, so a NaN or inf there cannot leak in, and an
    all-masked batch gives exactly 0 with a zero gradient instead of 0/0.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    count = mask.sum() if num_tokens is None else num_tokens
    count = torch.as_tensor(count, device=values.device)
    # only a zero count is replaced (all masked: 0, not 0/0); a fractional one is a window's share
    return total / torch.where(count > 0, count, torch.ones_like(count)).to(values.dtype)
