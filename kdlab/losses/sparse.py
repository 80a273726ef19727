"""The sparse teacher view (the teacher's top-k plus one tail outcome) and the coarsened partition.

A cached teacher (``teacher_cache.k``, kdlab/teacher_cache.py) keeps, per labelled position, the
teacher's k largest logits z (values and token ids), the log-normaliser log Σ_v exp(z_v/τ) and
the log of the probability outside the top-k, log m with m = 1 − Σ_top-k p. How m spreads over
the other V − k ids is not kept, so no objective can be evaluated on the full vocabulary.

**The tail treatment (one, shared by every objective).** The vocabulary is coarsened to k + 1
outcomes: the teacher's k top ids and one aggregated tail. The teacher is known exactly on that
partition (p_1 … p_k, m). The student is coarsened the same way: q at those k ids, and the rest
of its mass, 1 − Σ_top-k q, computed as a log-sum-exp over the other ids (never by subtraction,
which cancels when the student's tail is small). Every divergence of docs/methods.md §1 is then
computed *exactly* on the two coarsened distributions (:func:`coarsen` returns their logs, which
the §1 functions take as logits: a log_softmax of normalised log-probabilities is the identity).
Each §1 divergence (KL, reverse KL, JS(β), skew KL / skew reverse KL, TV) is an f-divergence, so by
the data-processing inequality the coarsened value is a lower bound of the full one; it grows
with k (the partitions are nested) and equals it at k = V, or when p and q are proportional
inside the tail. The student's gradient pushes its top-k probabilities and its total tail mass
toward the teacher's and leaves the shape of its tail as it is (within the tail the gradient is
spread in proportion to q). Why this treatment: it uses only what is known of the teacher.
Renormalising p over its top-k would drop the mass m (no longer a bound, and reverse KL on the
student's tail undefined); spreading m evenly over the tail ids would invent a flat teacher tail
and pull the student's tail toward it.

RLKD's ranking term (docs/methods.md §2) needs the teacher's values on S = top-k(teacher) ∪
top-k(student): an id of S outside the cached top-k gets the tail mass spread evenly, m/(V − k)
(:func:`teacher_values_at`) — the maximum-entropy completion of the coarsened teacher. It is at
most the k-th cached probability (an average of values that are each at most that), so unknown
ids rank below every cached id and tie among themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kdlab.losses.dtypes import upcast


@dataclass
class SparseTeacher:
    """The teacher at each position as its top-k logits, log-normaliser and log tail mass.

    ``values`` (..., k): the k largest teacher logits z (before the temperature), descending;
    ``indices`` (..., k): their token ids; ``log_norm`` (...): log Σ_v exp(z_v/τ) over the
    distillation vocabulary; ``log_tail`` (...): log(1 − Σ_top-k p_τ), −inf when k covers the
    vocabulary. ``temperature``: the τ of ``log_norm`` and ``log_tail`` (the tail mass at one τ
    cannot be derived from another's, so a view serves the objectives at its own τ only).
    """

    values: Tensor
    indices: Tensor
    log_norm: Tensor
    log_tail: Tensor
    temperature: float = 1.0

    TENSORS: ClassVar[tuple[str, ...]] = ("values", "indices", "log_norm", "log_tail")

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def map(self, fn: Callable[[Tensor], Tensor]) -> SparseTeacher:
        """The same view with ``fn`` applied to each tensor (row selection, reshapes): ``fn`` must
        act on the leading (position) dimensions only."""
        return SparseTeacher(*(fn(getattr(self, name)) for name in self.TENSORS), temperature=self.temperature)

    def __getitem__(self, rows) -> SparseTeacher:
        """The view at some positions (an index over the leading dimensions, as for logits)."""
        return self.map(lambda t: t[rows])

    def flatten_rows(self) -> SparseTeacher:
        return SparseTeacher(
            self.values.reshape(-1, self.k),
            self.indices.reshape(-1, self.k),
            self.log_norm.reshape(-1),
            self.log_tail.reshape(-1),
            self.temperature,
        )

    def log_probs(self) -> Tensor:
        """log p_τ at the top-k ids, (..., k)."""
        values = upcast(self.values)
        return values / self.temperature - self.log_norm.to(values.dtype).unsqueeze(-1)


def sparse_teacher(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> SparseTeacher:
    """The sparse view of dense teacher logits (..., V): what the cache stores, and the tests' reference.

    k = V is allowed here (the partition is then the vocabulary itself and every objective equals
    its dense value); the cache refuses it, as it would only store the dense teacher permuted.
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"the sparse teacher needs 1 <= k <= V = {vocab}, got k={k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = upcast(teacher_logits.detach())
    top = z.topk(k, dim=-1)  # sorted, largest first
    scaled = z / temperature
    log_norm = torch.logsumexp(scaled, dim=-1)
    if k == vocab:
        log_tail = torch.full_like(log_norm, float("-inf"))
    else:
        log_tail = torch.logsumexp(scaled.scatter(-1, top.indices, float("-inf")), dim=-1) - log_norm
    return SparseTeacher(top.values, top.indices, log_norm, log_tail, float(temperature))


def coarsen(student_logits: Tensor, teacher: SparseTeacher, temperature: float) -> tuple[Tensor, Tensor]:
    """(log q̄, log p̄) over the k + 1 outcomes of the partition (the k teacher ids, then the tail).

    Exact on the partition, differentiable in ``student_logits`` (..., V). With k = V the tail
    outcome is empty in both distributions and is left out (k outcomes), which also keeps a
    0·log 0 term out of the gradient.
    """
    if temperature != teacher.temperature:
        raise ValueError(
            f"the sparse teacher was computed at temperature {teacher.temperature}, the objective uses {temperature}: "
            "the tail mass depends on the temperature, so the teacher cache keys its entries by it; build the view "
            "(or the cache) at the objective's loss.temperature"
        )
    vocab = student_logits.shape[-1]
    if teacher.k > vocab:
        raise ValueError(f"the sparse teacher has k={teacher.k} ids, more than the student's {vocab} logits")
    z = upcast(student_logits) / temperature
    index = teacher.indices.long()
    log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
    log_q = z.gather(-1, index) - log_norm
    log_p = teacher.log_probs().to(log_q.dtype)
    if teacher.k == vocab:
        return log_q, log_p
    log_q_tail = torch.logsumexp(z.scatter(-1, index, float("-inf")), dim=-1, keepdim=True) - log_norm
    log_p_tail = teacher.log_tail.to(log_q.dtype).unsqueeze(-1)
    return torch.cat([log_q, log_q_tail], dim=-1), torch.cat([log_p, log_p_tail], dim=-1)


def teacher_values_at(teacher: SparseTeacher, ids: Tensor, vocab: int, rank_logits: bool) -> Tensor:
    """The teacher's values (float64) at token ``ids`` (..., n), as RLKD ranks them (τ = 1).

    A cached id gets its own value: its probability exp(z − log_norm), or its logit z with
    ``rank_logits``. Any other id gets the tail mass spread evenly over the V − k uncached ids,
    m/(V − k), or the logit of that probability, log m − log(V − k) + log_norm (module docstring).
    """
    if teacher.temperature != 1.0:
        raise ValueError(
            f"RLKD ranks the teacher's probabilities at temperature 1; this sparse teacher is at {teacher.temperature}"
        )
    match = ids.unsqueeze(-1) == teacher.indices.unsqueeze(-2)  # (..., n, k): each id matches at most one
    known = match.any(-1)
    at = match.to(torch.uint8).argmax(-1)
    values = teacher.values.gather(-1, at).double()
    log_norm = teacher.log_norm.double().unsqueeze(-1)
    uncached = vocab - teacher.k
    # −inf when every id is cached (k = V): then no id takes this branch
    log_unknown = teacher.log_tail.double().unsqueeze(-1) - (math.log(uncached) if uncached > 0 else float("inf"))
    if rank_logits:
        return torch.where(known, values, log_unknown + log_norm)
    return torch.where(known, torch.exp(values - log_norm), torch.exp(log_unknown))

