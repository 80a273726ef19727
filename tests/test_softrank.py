"""kdlab.losses.softrank against independent references: scikit-learn's isotonic regression, the
variational characterisation of the projection onto the permutahedron, scipy's hard ranks."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.isotonic import IsotonicRegression

from kdlab.losses.softrank import isotonic_decreasing, soft_rank


def _reference_soft_rank(x: np.ndarray, eps: float) -> np.ndarray:
    """P(x/eps, (n, …, 1)) for one row, with scikit-learn's PAV as the isotonic solver."""
    n = len(x)
    z = x / eps
    order = np.argsort(-z, kind="stable")
    s = z[order]
    v = IsotonicRegression(increasing=False).fit_transform(np.arange(n), s - np.arange(n, 0, -1))
    out = np.empty(n)
    out[order] = s - v
    return out


def _rows(n: int, ties: bool, rows: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + n)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * 3
    return x.round() if ties else x  # rounding to integers makes many exact ties


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 30])
@pytest.mark.parametrize("ties", [False, True])
def test_isotonic_matches_sklearn(n, ties):
    y = _rows(n, ties)
    ref = np.stack([IsotonicRegression(increasing=False).fit_transform(np.arange(n), row) for row in y.numpy()])
    np.testing.assert_allclose(isotonic_decreasing(y).numpy(), ref, atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 30])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("eps", [0.1, 1.0, 10.0])
def test_soft_rank_matches_reference(n, ties, eps):
    x = _rows(n, ties)
    ref = np.stack([_reference_soft_rank(row, eps) for row in x.numpy()])
    np.testing.assert_allclose(soft_rank(x, eps).numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("eps", [0.3, 1.0, 3.0])
def test_soft_rank_is_the_projection_onto_the_permutahedron(n, eps):
    """μ = P(z, w) iff μ ∈ P(w) and ⟨z − μ, π − μ⟩ ≤ 0 for every vertex π (every permutation of w):
    a brute-force check of the definition that shares no code with the isotonic formulation."""
    w = np.arange(n, 0, -1, dtype=np.float64)
    vertices = np.array(list(itertools.permutations(w)))
    for row in _rows(n, ties=True, rows=5).numpy():
        z = row / eps
        mu = soft_rank(torch.tensor(row), eps).numpy()
        # membership: partial sums of sorted μ are majorised by those of w, with equal totals
        assert np.all(np.cumsum(np.sort(mu)[::-1]) <= np.cumsum(w) + 1e-9)
        assert abs(mu.sum() - w.sum()) < 1e-9
        assert np.max((vertices - mu) @ (z - mu)) <= 1e-9


@pytest.mark.parametrize("n", [2, 5, 12, 30])
def test_tiny_strength_gives_hard_ascending_ranks(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(8, n, generator=g, dtype=torch.float64)
    hard = np.stack([rankdata(row) for row in x.numpy()])  # ascending, 1-based: the largest gets n
    # gaps between distinct normals are ≫ 1e-6, so strength 1e-6 is far in the hard regime
    np.testing.assert_allclose(soft_rank(x, 1e-6).numpy(), hard, atol=1e-3)
    # float32, strength 1e-2, values 0.1 apart: |x/eps| ≤ 300 keeps the cumsum rounding ≪ 1e-3
    spread = torch.randperm(n, generator=g).float() / 10
    np.testing.assert_allclose(soft_rank(spread, 1e-2).numpy(), rankdata(spread.numpy()), atol=1e-3)


def test_hard_ranks_example():
    x = torch.tensor([0.3, -1.0, 2.0, 0.1])
    assert soft_rank(x, 1e-3).tolist() == pytest.approx([3.0, 1.0, 4.0, 2.0], abs=1e-3)


@pytest.mark.parametrize("n", [2, 7, 30])
def test_huge_strength_gives_the_mean_rank(n):
    x = _rows(n, ties=False, rows=4)
    np.testing.assert_allclose(soft_rank(x, 1e8).numpy(), np.full((4, n), (n + 1) / 2), atol=1e-6)


def test_ranks_sum_to_n_n_plus_1_over_2():
    x = _rows(9, ties=False)
    torch.testing.assert_close(soft_rank(x, 0.7).sum(-1), torch.full((20,), 45.0, dtype=torch.float64))


def test_batched_equals_per_row():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, generator=g)
    batched = soft_rank(x, 0.5)
    for i, j in itertools.product(range(3), range(4)):
        torch.testing.assert_close(batched[i, j], soft_rank(x[i, j], 0.5))


@pytest.mark.parametrize("eps", [0.3, 1.0, 20.0])  # 20: the pooled-runs shortcut
def test_gradcheck(eps):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, eps), (x,))


def test_gradient_is_block_averaging():
    """Fully pooled (all values within the strength): rank = x/eps + const, so ∂rank_i/∂x_j = δ_ij/eps
    minus the centring 1/(n·eps); check one Jacobian by hand."""
    x = torch.tensor([0.1, 0.4, 0.2], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: soft_rank(t, 1.0), x)
    torch.testing.assert_close(jac, torch.eye(3, dtype=torch.float64) - 1 / 3)


def test_rejects_non_positive_strength():
    with pytest.raises(ValueError, match="regularization_strength"):
        soft_rank(torch.zeros(3), 0.0)


def test_isotonic_fast_path_matches_sklearn():
    """Rows made of increasing runs with decreasing run means take the pooled-runs shortcut."""
    g = torch.Generator().manual_seed(3)
    runs = [torch.sort(torch.rand(20, 4, generator=g, dtype=torch.float64), dim=-1).values - 2 * r for r in range(3)]
    y = torch.cat(runs, dim=-1)  # means 0.5, -1.5, -3.5 (roughly): already decreasing
    ref = np.stack([IsotonicRegression(increasing=False).fit_transform(np.arange(12), row) for row in y.numpy()])
    np.testing.assert_allclose(isotonic_decreasing(y).numpy(), ref, atol=1e-12)
    y[0, 4:8] += 10  # one row breaks the shortcut: the batch takes the general path
    ref[0] = IsotonicRegression(increasing=False).fit_transform(np.arange(12), y[0].numpy())
    np.testing.assert_allclose(isotonic_decreasing(y).numpy(), ref, atol=1e-12)
