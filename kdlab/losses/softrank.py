"""Differentiable soft rank in pure PyTorch (Blondel et al. 2020, "Fast Differentiable Sorting and
Ranking", ICML), l2 regularisation — the semantics of
``torchsort.soft_rank(x, regularization="l2", regularization_strength=eps)`` (docs/methods.md §2, step 2).

Ranks are ascending and 1-based: as eps → 0 the largest value gets rank n and the smallest rank 1;
as eps → ∞ every rank tends to the mean (n+1)/2.

The soft rank is the Euclidean projection of θ/eps onto the permutahedron of w = (n, n−1, …, 1)
(the paper's P_Q(z, w), Prop. 3 / Eq. for Q in the l2 case). With σ the permutation sorting
z = θ/eps in decreasing order and s = z_σ:

    P(z, w) = z − v(s) ∘ σ⁻¹,   v = argmin_{v_1 ≥ v_2 ≥ … ≥ v_n} ‖v − (s − w)‖²

i.e. a decreasing isotonic regression of y = s − w. (The paper writes the rank with the descending
convention r = P(−θ/eps, ρ); torchsort — and RLKD's code — uses the ascending one above.)

The isotonic fit uses the min–max closed form (Robertson, Wright & Dykstra 1988, Thm 1.4.4):

    v_i = min_{j ≤ i} max_{k ≥ i} mean(y_j, …, y_k) = max_{k ≥ i} min_{j ≤ i} mean(y_j, …, y_k)

computed for all i at once from cumulative sums: O(n²) memory per row, vectorised over every leading
dimension, no Python loop over the batch. n is small in kdlab (≤ 2k = 30), so this is cheaper than a
sequential pool-adjacent-violators loop. Plain autograd through cumsum/cummin/max gives the exact
Jacobian of the projection almost everywhere (the block-averaging matrix: each output depends on the
mean of its pooled block), so no custom autograd.Function is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _pool_nondecreasing_runs(y: Tensor) -> Tensor:
    """Replace every maximal non-decreasing run of y by its mean (differentiably)."""
    run = torch.cat([torch.zeros_like(y[..., :1], dtype=torch.long), (y[..., 1:] < y[..., :-1]).long().cumsum(-1)], -1)
    sums = torch.zeros_like(y).scatter_add(-1, run, y)
    counts = torch.zeros_like(y).scatter_add(-1, run, torch.ones_like(y))
    return (sums / counts.clamp(min=1)).gather(-1, run)


def isotonic_decreasing(y: Tensor) -> Tensor:
    """argmin_v ‖v − y‖² subject to v_1 ≥ v_2 ≥ … ≥ v_n, along the last dim (batched).

    Uses v_i = max_{k ≥ i} min_{j ≤ i} mean(y_j..y_k) (equal to the min–max form above), laid out
    as (k, j) so that the inner minimum is a cumulative min along the contiguous last dim.
    """
    n = y.shape[-1]
    pooled = _pool_nondecreasing_runs(y)
    if bool((pooled[..., 1:] <= pooled[..., :-1]).all()):
        # Exact shortcut (one host sync on GPU): pooling each maximal non-decreasing run is what
        # pool-adjacent-violators does first, and if the run means already decrease it is done.
        # Soft ranks of values spread by less than eps land here (RLKD's default: probabilities
        # at strength 1, with its padding as a second run).
        return pooled
    csum = torch.cat([torch.zeros_like(y[..., :1]), y.cumsum(-1)], dim=-1)  # csum[i] = y_0 + … + y_{i-1}
    idx = torch.arange(n, device=y.device)
    # Block means M[k, j] = mean(y[j..k]). Entries with j > k are meaningless but finite (count
    # clamped to 1) and only ever reach (k, i) with k < i, which the mask below discards.
    inv_count = 1.0 / (idx[:, None] - idx[None, :] + 1).clamp(min=1).to(y.dtype)
    means = (csum[..., 1:, None] - csum[..., None, :-1]) * inv_count  # (..., k, j)
    inner = means.cummin(dim=-1).values  # inner[k, i] = min_{j ≤ i} M[k, j]
    k_before_i = idx[:, None] < idx[None, :]
    exclude = torch.zeros(n, n, dtype=y.dtype, device=y.device).masked_fill(k_before_i, float("-inf"))
    return (inner + exclude).max(dim=-2).values  # max over k ≥ i


def soft_rank(values: Tensor, regularization_strength: float = 1.0) -> Tensor:
    """Soft ranks of ``values`` (..., n) along the last dim, ascending and 1-based (see module doc).

    ``regularization_strength`` is eps: rank(x) = P(x/eps, (n, …, 1)). Differentiable; batched over
    all leading dims; computed in the input's dtype. The block means come from cumulative sums, so
    the absolute error is about n · max|x/eps| · (machine epsilon): pass float64 when x/eps spans
    thousands (kdlab's RLKD always does).
    """
    if regularization_strength <= 0:
        raise ValueError(f"regularization_strength must be > 0, got {regularization_strength}")
    n = values.shape[-1]
    if n == 0:
        return values
    z = values / regularization_strength
    s, perm = z.sort(dim=-1, descending=True)
    w = torch.arange(n, 0, -1, device=values.device, dtype=values.dtype)  # (n, n-1, …, 1)
    ranks_sorted = s - isotonic_decreasing(s - w)
    # undo the sort: scatter the sorted-order ranks back to the input positions (σ⁻¹)
    return torch.empty_like(ranks_sorted).scatter(-1, perm, ranks_sorted)
