"""RLKD — Ranking Loss based Knowledge Distillation (Peng & Zhang, COLING 2025, arXiv 2409.12545),
exactly as specified in docs/methods.md §2 (steps 1–6 are cited below as §2.1 … §2.6).

Per valid position t:

1. S = top-k(z_T) ∪ top-k(z_S)  (§2.1; de-duplicated per row by default);
2. soft ranks (Blondel et al. 2020, l2, strength eps; :func:`kdlab.losses.softrank.soft_rank`) of
   the teacher's and the student's values at S — probabilities p, q at τ = 1 by default (§2.2),
   raw logits with ``rank_logits=True`` (the authors' code);
3. ρ_t = ⟨c_T/‖c_T‖, c_S/‖c_S‖⟩, c = soft ranks centred over S (Spearman, §2.3);
4. L_rank = masked mean of (1 − ρ_t) (§2.4);
5. L = w_rank · L_rank + L_base (§2.5, the paper's Eq. 1 context), w_rank = 2;
6. optionally L = w_rank · L_rank + (abs(top-k(p) ∩ top-k(q)) / k) · L_base (§2.6, paper App. D Eq. 2).

Note on the default (probabilities, strength 1.0): probabilities differ by less than 1, so the
sorted y = s − w in the projection is non-decreasing, isotonic regression pools everything, and the
soft rank is exactly p + const. ρ is then the Pearson correlation of p and q over S — this is what
the paper's setting computes; ``rank_logits=True`` (logits spread by more than 1) gives a sharper,
more rank-like signal. Both are tested.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdlab.agreement import topk_overlap
from kdlab.losses.base import IGNORE_INDEX, KDBatch, LossOutput, Needs, masked_mean, needs_of
from kdlab.losses.chunked import RowwiseLoss, check_chunk_size, check_fused_head
from kdlab.losses.softrank import soft_rank
from kdlab.losses.sparse import SparseTeacher, teacher_values_at

# ‖centred soft ranks‖ (rank units, float64) at or below this counts as "all values equal": ρ := 0.
# loss.k's ceiling: the soft rank's exact pooling is quadratic in the 2k ranked values, 2 MiB per
# position at k = 256 (the papers use 5 and 15); k at or above the vocabulary is clamped to it.
MAX_K = 256
# Float64 rounding leaves ~1e-14 on a truly constant row; genuine spreads are far above 1e-12.
_DEGENERATE_NORM = 1e-12


def _masked_soft_rank(values: Tensor, valid: Tensor, regularization_strength: float) -> Tensor:
    """Soft ranks of the valid entries of each row; invalid entries are set out of the way.

    Invalid entries are placed at min(valid)/eps − (n+1) in the scaled space z = x/eps. Then every
    y = s − w of an invalid entry (≤ s_pad − 1) is below every y of a valid entry (≥ s_min − n), so
    the decreasing isotonic regression never pools across the two groups (each group's own fit is
    feasible for the joint problem, hence optimal). The valid group sees weights w' + m instead of
    w' (m = number of invalid entries), and isotonic regression is translation-equivariant, so
    each valid soft rank equals its unpadded soft rank + m: a shift that the centring in
    :func:`_spearman` removes exactly. (Tested against the unpadded computation.)
    """
    n = values.shape[-1]
    lowest = torch.where(valid, values, torch.full_like(values, float("inf"))).amin(-1, keepdim=True)
    pad = (lowest - (n + 1) * regularization_strength).detach()
    return soft_rank(torch.where(valid, values, pad), regularization_strength)


def _spearman(rank_a: Tensor, rank_b: Tensor, valid: Tensor) -> Tensor:
    """Dot product of the centred, L2-normalised rank vectors over the valid entries; 0 where
    either centred vector has (numerically) zero norm — there the ranking is undefined."""
    zero = torch.zeros((), dtype=rank_a.dtype, device=rank_a.device)
    count = valid.sum(-1, keepdim=True)

    def centred(r: Tensor) -> Tensor:
        r = torch.where(valid, r, zero)
        return torch.where(valid, r - r.sum(-1, keepdim=True) / count, zero)

    ca, cb = centred(rank_a), centred(rank_b)
    sq_a, sq_b = (ca * ca).sum(-1), (cb * cb).sum(-1)
    ok = (sq_a > _DEGENERATE_NORM**2) & (sq_b > _DEGENERATE_NORM**2)
    one = torch.ones((), dtype=rank_a.dtype, device=rank_a.device)
    # the sqrt only sees safe values, so its gradient stays finite where ρ is defined as 0
    denom = torch.sqrt(torch.where(ok, sq_a, one) * torch.where(ok, sq_b, one))
    return torch.where(ok, (ca * cb).sum(-1) / denom, zero)


def _values_at_union(
    student_logits: Tensor, teacher_logits: Tensor | SparseTeacher, k: int, rank_logits: bool, dedupe_union: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Student values, teacher values (float64) and validity at S, each (..., 2k) (§2.1–2.2).

    Works on the full (B, T, V) logits without copying them: only top-k, a gather and a logsumexp
    touch the vocabulary dimension. A sparse teacher (the teacher cache) gives its top-k ids, and
    its values at S by :func:`kdlab.losses.sparse.teacher_values_at` (an uncached id of the
    student's top-k gets the tail mass spread evenly, m/(V − k)).
    """
    if k < 1:
        raise ValueError(f"RLKD k must be >= 1, got {k}")
    k = min(k, student_logits.shape[-1])  # documented: with k >= V, S is the whole vocabulary
    sparse = isinstance(teacher_logits, SparseTeacher)
    t_idx = _sparse_top(teacher_logits, k) if sparse else teacher_logits.topk(k, dim=-1).indices
    s_idx = student_logits.detach().topk(k, dim=-1).indices
    index = torch.cat([t_idx, s_idx], dim=-1)  # fixed width 2k
    valid = torch.ones_like(index, dtype=torch.bool)
    if dedupe_union:
        # a student index already among the teacher's top-k is a duplicate (each list is distinct)
        valid[..., k:] = ~(s_idx[..., :, None] == t_idx[..., None, :]).any(-1)

    def values_at_s(logits: Tensor) -> Tensor:
        gathered = logits.gather(-1, index).double()
        if rank_logits:
            # a −inf logit (a masked vocabulary entry) ranks last: placed 1 below the row's lowest finite
            # value, since a soft rank of −inf is NaN (its probability, 0, needs no such care)
            finite = torch.isfinite(gathered)
            if not bool(finite.all()):
                lowest = torch.where(finite, gathered, torch.full_like(gathered, float("inf"))).amin(-1, keepdim=True)
                gathered = torch.where(finite, gathered, lowest - 1.0)
            return gathered
        # p = exp(z − logsumexp z), only at S: no full-vocabulary softmax is materialised
        # (float32 at least, float64 logits keep float64, as in the §1 divergences)
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return torch.exp(gathered - torch.logsumexp(wide, dim=-1, keepdim=True).double())

    if sparse:
        teacher_values = teacher_values_at(teacher_logits, index, student_logits.shape[-1], rank_logits)
    else:
        teacher_values = values_at_s(teacher_logits)
    return values_at_s(student_logits), teacher_values, valid


def _sparse_top(teacher: SparseTeacher, k: int) -> Tensor:
    """The teacher's top-k ids from a sparse view (sorted, largest first), which must hold at least k."""
    if teacher.k < k:
        raise ValueError(
            f"RLKD needs the teacher's top-{k} ids (loss.k={k}), the cached teacher holds {teacher.k}: "
            f"set teacher_cache.k >= {k} or lower loss.k"
        )
    return teacher.indices[..., :k].long()


def _overlap(student_logits: Tensor, teacher: Tensor | SparseTeacher, mask: Tensor, k: int) -> Tensor:
    """abs(top-k(p) ∩ top-k(q)) / k (§2.6), from dense teacher logits or a sparse view's top-k ids."""
    if not isinstance(teacher, SparseTeacher):
        return topk_overlap(student_logits, teacher, mask, k)
    k = min(k, student_logits.shape[-1])
    s_idx = student_logits.detach().topk(k, dim=-1).indices
    common = (s_idx[..., :, None] == _sparse_top(teacher, k)[..., None, :]).any(-1).sum(-1)
    return torch.where(mask, common / k, torch.zeros((), device=common.device)).float()


def _spearman_from_values(student_values: Tensor, teacher_values: Tensor, valid: Tensor, strength: float) -> Tensor:
    rank_s = _masked_soft_rank(student_values, valid, strength)
    rank_t = _masked_soft_rank(teacher_values, valid, strength)
    return _spearman(rank_s, rank_t, valid)


def spearman_per_row(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    k: int = 5,
    regularization_strength: float = 1.0,
    rank_logits: bool = False,
    dedupe_union: bool = True,
) -> Tensor:
    """Soft Spearman ρ between teacher and student at S: logits (..., V) → (...) (§2.1–2.3).

    k is clamped to V (with k ≥ V, S is the whole vocabulary). The teacher is detached: it is
    frozen, and the ranking loss trains the student only. Ranks and ρ are computed in float64 (on
    2k values per position, cheap): the probabilities of a flat teacher can differ by 1e-6 while
    soft ranks are ~n, and float32 would round those differences away.
    """
    values = _values_at_union(student_logits, teacher_logits.detach(), k, rank_logits, dedupe_union)
    return _spearman_from_values(*values, regularization_strength)


def ranking_loss_per_token(
    student_logits: Tensor,
    teacher_logits: Tensor | SparseTeacher,
    labels: Tensor | None,
    *,
    k: int = 5,
    regularization_strength: float = 1.0,
    rank_logits: bool = False,
    dedupe_union: bool = True,
) -> Tensor:
    """Per-token 1 − ρ_t (docs/methods.md §2.1–2.4) of shape (B, T), 0 where labels == IGNORE_INDEX.

    ``dedupe_union=False`` is the authors' concatenation: 2k entries with duplicates kept (a token
    in both top-k lists appears twice, tied). The soft ranks are computed at valid positions only.
    ``teacher_logits`` may be a sparse view (the teacher cache, kdlab.losses.sparse) of at least k ids.
    """
    mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    if labels is not None:
        mask = labels != IGNORE_INDEX
    teacher = teacher_logits if isinstance(teacher_logits, SparseTeacher) else teacher_logits.detach()
    s_val, t_val, valid = _values_at_union(student_logits, teacher, k, rank_logits, dedupe_union)
    rho = _spearman_from_values(s_val[mask], t_val[mask], valid[mask], regularization_strength)
    # float32 at least (like the divergences), so bf16 logits do not round the loss
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    per_token = torch.zeros(mask.shape, dtype=dtype, device=student_logits.device)
    return per_token.masked_scatter(mask, (1.0 - rho).to(per_token.dtype))


class RankingKD(RowwiseLoss):
    """``loss=rlkd``: RLKD, L = w_rank · L_rank + L_base (docs/methods.md §2.5; paper Eq. 1 context).

    Args:
        base: the base objective — a loss name built with :func:`kdlab.losses.divergences.load_loss`
            (``"fkl"``, ``"tvd"``, …), a callable ``KDBatch -> LossOutput``, or None / ``"none"``
            for the ranking loss alone.
        k: top-k size of each list in S. None → 5 with a base, 15 alone (§2.1). Clamped to V.
        rank_weight: w_rank. None → 2.0 with a base (§2.5), 1.0 alone (the ranking loss alone is
            L_rank, as in the paper and in the authors' ``only_rank_loss``). An explicit value
            always applies.
        regularization_strength: eps of the soft rank (§2.2), 1.0.
        dynamic_weighting: §2.6 (paper App. D, Eq. 2): L_base is multiplied by the scalar
            w = mean over the batch's valid positions of abs(top-k(p) ∩ top-k(q)) / k (local valid
            count, not ``num_tokens``: it is an average weight, not part of the token sum). Logged
            as ``base_weight``.
        rank_logits, dedupe_union: the authors' code variants (see :func:`ranking_loss_per_token`).
        authors_combination: the authors' code: L = L_rank + L_base / w_rank (with w_rank = 2:
            rank + base/2, the paper's loss scaled by ½), and L = L_base alone when L_rank is NaN.
        chunk_size, fused_head: how it is computed (kdlab.losses.chunked, kdlab.losses.fused), not
            what; neither applies to ``dynamic_weighting`` or ``authors_combination`` (not token sums).

    Returns LossOutput with logs ``L_rank``, ``L_base`` and the base's own logs (plus
    ``base_weight`` with dynamic weighting). ``per_token`` is the combined per-token value whose
    masked mean is the loss (w_rank·(1−ρ_t) + w·base_t, or the authors' combination) when the base
    provides per_token; the ranking term alone without a base; None if the base gives none.
    """

    def __init__(
        self,
        base: str | Callable[[KDBatch], LossOutput] | None = "fkl",
        k: int | None = None,
        rank_weight: float | None = None,
        regularization_strength: float = 1.0,
        dynamic_weighting: bool = False,
        rank_logits: bool = False,
        dedupe_union: bool = True,
        authors_combination: bool = False,
        chunk_size: int | None = None,
        fused_head: bool = False,
    ):
        self.chunk_size = check_chunk_size(chunk_size)
        self.fused_head = check_fused_head(fused_head)
        if isinstance(base, str) and base.lower() == "none":
            base = None
        if isinstance(base, str):
            from kdlab.losses.divergences import load_loss

            base = load_loss(base)
        self.base = base
        self.k = k if k is not None else (5 if base is not None else 15)
        self.rank_weight = rank_weight if rank_weight is not None else (2.0 if base is not None else 1.0)
        if self.k < 1:
            raise ValueError(f"loss.k must be >= 1, got {self.k}")
        if self.k > MAX_K:
            raise ValueError(
                f"loss.k={self.k}: each position ranks up to 2k values, and the soft rank's pooling can need "
                f"(2k)² float64 per position ({(2 * self.k) ** 2 * 8 / 2**30:.1f} GiB at k={self.k}); RLKD's settings are "
                f"k=5 (15 alone). Set loss.k <= {MAX_K}"
            )
        if self.rank_weight < 0:
            raise ValueError(f"loss.rank_weight must be >= 0, got {self.rank_weight}")
        if regularization_strength <= 0:
            raise ValueError(f"loss.regularization_strength must be > 0, got {regularization_strength}")
        if base is None and (dynamic_weighting or authors_combination):
            raise ValueError("loss.dynamic_weighting and loss.authors_combination need a base loss (loss.base)")
        if authors_combination and self.rank_weight == 0:
            raise ValueError("loss.authors_combination divides the base loss by loss.rank_weight; it must be > 0")
        self.regularization_strength = regularization_strength
        self.dynamic_weighting = dynamic_weighting
        self.rank_logits = rank_logits
        self.dedupe_union = dedupe_union
        self.authors_combination = authors_combination
        if fused_head and not self.chunkable:
            raise ValueError(
                "loss.fused_head=true computes the loss chunk by chunk, but loss.dynamic_weighting and "
                "loss.authors_combination use batch-wide averages; set loss.fused_head=false or turn them off"
            )

    @property
    def chunkable(self) -> bool:
        # dynamic weighting averages a weight over the batch, the authors' guard tests the batch's
        # mean: neither is a token sum, so both run densely
        return not (self.dynamic_weighting or self.authors_combination)

    @property
    def needs(self) -> Needs:
        """The teacher's logits; the teacher cache's sparse view when the base takes one too (the ranking
        term does, kdlab.losses.sparse), computed at τ = 1, at which the ranking term takes p (§2.2)."""
        base = needs_of(self.base) if self.base is not None else Needs(teacher=False)
        return Needs(
            teacher=True,
            sparse_teacher=not base.teacher or base.sparse_teacher,
            fused_head=self.fused_head,
            ranked_top_k=self.k,
            teacher_temperature=1.0 if not base.teacher or base.teacher_temperature == 1.0 else None,
        )

    def dense(self, batch: KDBatch) -> LossOutput:
        teacher = batch.teacher_sparse if batch.teacher_sparse is not None else batch.teacher_logits
        if teacher is None:
            raise ValueError("RankingKD needs teacher logits; the module passed none")
        rank_tok = ranking_loss_per_token(
            batch.student_logits,
            teacher,
            batch.labels,
            k=self.k,
            regularization_strength=self.regularization_strength,
            rank_logits=self.rank_logits,
            dedupe_union=self.dedupe_union,
        )
        l_rank = masked_mean(rank_tok, batch.mask, batch.num_tokens)
        logs = {"L_rank": l_rank.detach()}
        if self.base is None:
            loss = self.rank_weight * l_rank
            return LossOutput(loss=loss, logs=logs, per_token=(self.rank_weight * rank_tok).detach())

        base_out = self.base(batch)
        logs.update(base_out.logs)
        logs["L_base"] = base_out.loss.detach()
        base_tok = base_out.per_token
        weight = 1.0
        if self.dynamic_weighting:
            overlap = _overlap(batch.student_logits, teacher, batch.mask, self.k)
            weight = masked_mean(overlap, batch.mask)  # local valid count: a mean weight
            logs["base_weight"] = weight.detach()

        if self.authors_combination:
            if torch.isnan(l_rank):  # the authors' guard against "rare operator anomalies"
                return LossOutput(loss=weight * base_out.loss, logs=logs, per_token=_scaled(base_tok, weight))
            loss = l_rank + weight * base_out.loss / self.rank_weight
            per_token = None if base_tok is None else rank_tok.detach() + _scaled(base_tok, weight) / self.rank_weight
        else:
            loss = self.rank_weight * l_rank + weight * base_out.loss
            per_token = None if base_tok is None else self.rank_weight * rank_tok.detach() + _scaled(base_tok, weight)
        return LossOutput(loss=loss, logs=logs, per_token=per_token)


def _scaled(per_token: Tensor | None, weight: float | Tensor) -> Tensor | None:
    if per_token is None:
        return None
    return (weight * per_token).detach()
