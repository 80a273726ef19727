"""The loss contract every kdlab objective implements (docs/objectives.md, "Adding a loss").

A loss is a plain callable built by Hydra from ``kdlab/conf/loss/<name>.yaml``. It declares what
it consumes as ``needs`` (a :class:`Needs`); the training step (kdlab/steps.py) reads that
declaration once, through :func:`needs_of`, picks the step that provides it, hands the loss one
:class:`KDBatch` (a :class:`RolloutKDBatch` on rollouts) and logs what comes back in
:class:`LossOutput`; a loss never logs itself. Nothing outside :func:`needs_of` inspects a loss.
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
class RolloutSettings:
    """How a loss that trains on rollouts gets its samples (``Needs.rollouts``; kdlab/rollout.py draws them).

    Sampling: ``teacher_mix`` α (p̃ = α·p + (1−α)·q), ``temperature``, ``top_p``, ``top_k``
    (0 = off), ``max_new_tokens`` (None = the data's longest answer + <eos>), ``use_cache``.
    Loop: ``num_rollouts`` prompts of the current data batch are sampled (None = the whole batch;
    more than the batch repeats its prompts, each sampled independently), then served as
    mini-batches of ``mini_batch_size`` (None = all) for ``epochs`` shuffled passes — one
    optimisation step each — before the next refresh. ``fraction`` of the training steps use
    rollouts (the others are ordinary data batches; GKD's λ). ``log_student_rev_kl``: with α > 0,
    also sample the pure student at each refresh to log its sequence-level reverse KL.
    """

    teacher_mix: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    use_cache: bool = True
    num_rollouts: int | None = None
    mini_batch_size: int | None = None
    epochs: int = 1
    fraction: float = 1.0
    log_student_rev_kl: bool = True

    def __post_init__(self):
        checks = {
            "teacher_mix": 0.0 <= self.teacher_mix <= 1.0,
            "temperature": self.temperature > 0,
            "top_p": 0.0 < self.top_p <= 1.0,
            "top_k": self.top_k >= 0,
            "max_new_tokens": self.max_new_tokens is None or self.max_new_tokens >= 1,
            "num_rollouts": self.num_rollouts is None or self.num_rollouts >= 1,
            "mini_batch_size": self.mini_batch_size is None or self.mini_batch_size >= 1,
            "epochs": self.epochs >= 1,
            "fraction": 0.0 <= self.fraction <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid rollout setting(s) {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}: teacher_mix and "
                "fraction in [0, 1], temperature > 0, top_p in (0, 1], top_k >= 0, the sizes >= 1 (or null)"
            )

    @property
    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "use_cache": self.use_cache}


@dataclass(frozen=True)
class Needs:
    """What a loss consumes, declared by every loss as its ``needs`` attribute.

    ``teacher``: the teacher's logits at the labelled positions (False: ``teacher_logits`` is None).
    ``sparse_teacher``: the loss also accepts the teacher cache's top-k view
    (``KDBatch.teacher_sparse``, kdlab.losses.sparse) instead, so ``teacher_cache.k`` can serve it.
    ``fused_head``: computed from hidden states and output heads (kdlab.losses.fused), no logits; the path
    calls the loss's :class:`kdlab.losses.chunked.RowwiseLoss` interface on each chunk of rows, so such a
    loss is one, and refuses the setting when built if its settings are no token sum (rlkd's dynamic_weighting).
    ``rollouts``: trains on samples of the data's prompts, drawn with these settings
    (a :class:`RolloutKDBatch` on those steps). ``plain_text``: the rollout batch carries a
    plain-text batch (``RolloutKDBatch.plain``) for a pre-training term; ``plain_text_teacher``:
    with the teacher's logits on it. ``ranked_top_k``: the teacher's top-k ids the loss ranks
    (RLKD), which a teacher cache must keep. ``teacher_temperature``: the τ at which a cached
    teacher's normaliser and tail are needed; None when the loss reads the teacher at two
    temperatures (one cache holds one). ``aligned``: an objective across tokenizers: the teacher
    runs on its own tokenisation and the loss gets an :class:`AlignedKDBatch` (kdlab/data/alignment.py);
    only such objectives accept a teacher whose tokenizer differs from the student's.
    """

    teacher: bool = True
    sparse_teacher: bool = False
    fused_head: bool = False
    rollouts: RolloutSettings | None = None
    plain_text: bool = False
    plain_text_teacher: bool = False
    ranked_top_k: int | None = None
    teacher_temperature: float | None = 1.0
    aligned: bool = False


def needs_of(loss) -> Needs:
    """``loss.needs``: the one place that inspects a loss. A plain callable that declares nothing
    is a token-level objective on the teacher's dense logits (``Needs()``)."""
    needs = getattr(loss, "needs", None)
    if needs is None:
        return Needs()
    if not isinstance(needs, Needs):
        raise TypeError(f"{type(loss).__name__}.needs must be a kdlab.losses.base.Needs, got {type(needs).__name__}")
    return needs


@dataclass
class KDBatch:
    """What the module hands every loss.

    ``student_logits`` and ``teacher_logits`` are aligned with ``labels``: position t predicts
    ``labels[:, t]``. ``num_tokens`` is the normaliser of the shared masked reduction; the module
    sets it to the global count of valid tokens when training is data-parallel.
    ``teacher_sparse``: the teacher as its top-k plus a tail outcome (kdlab.losses.sparse), given
    instead of ``teacher_logits`` when the teacher cache is on (``teacher_cache.k``); objectives
    that accept it say so with ``Needs(sparse_teacher=True)``.
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
class RolloutKDBatch(KDBatch):
    """A KDBatch on rollouts: logits and ``labels`` are those of the sampled sequences, plus the
    rollout-time log-probs of the sampled tokens (aligned with ``labels``, 0 elsewhere):
    ``old_logprobs`` (the student when sampling, q_old), ``sample_logprobs`` (p̃) and
    ``teacher_logprobs`` (p). ``plain`` is a KDBatch on plain text for a pre-training term (or
    None); ``stats`` are rollout statistics for the loss's logs."""

    old_logprobs: Tensor | None = None
    sample_logprobs: Tensor | None = None
    teacher_logprobs: Tensor | None = None
    plain: KDBatch | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class AlignedKDBatch(KDBatch):
    """A KDBatch across tokenizers (``Needs.aligned``): the student's logits at its N labelled positions
    as usual, and the teacher's only at the G aligned groups' first positions, each on its own
    vocabulary: ``teacher_logits`` (1, G, V_teacher) or ``teacher_sparse`` (1, G, k).
    ``aligned_rows`` (G,): which of the N student rows each teacher row is compared with (where
    both models have read the same text); ``matched`` (G,): the group is one token on each side,
    the same string in both vocabularies; ``shared_vocab``: (teacher ids, student ids) of the
    tokens the vocabularies share, column j of one being column j of the other."""

    aligned_rows: Tensor | None = None
    matched: Tensor | None = None
    shared_vocab: tuple[Tensor, Tensor] | None = None


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
