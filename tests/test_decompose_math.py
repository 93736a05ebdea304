"""The decomposition math on its own: exact SVD of thin products, truncated/randomized SVD vs the optimum,
energy-based ranks, and TIES / DARE (PEFT's merge_utils as the oracle where the conventions coincide)."""

from __future__ import annotations

import math

import pytest
import torch

from loraport import decompose as dc


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


@pytest.mark.parametrize("m,n,r", [(40, 70, 6), (50, 30, 12), (8, 9, 16)])
def test_lowrank_svd_matches_dense_svd(m, n, r):
    g = _gen(m + n + r)
    B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    d = dc.lowrank_svd(B, A)
    ref = torch.linalg.svdvals(B.double() @ A.double())
    k = min(m, n, r)
    assert d.S.shape[0] >= k
    torch.testing.assert_close(d.S[:k].double(), ref[:k], rtol=2e-6, atol=1e-5 * float(ref[0]))
    # the factors reproduce the product, and U, V are orthonormal
    torch.testing.assert_close(d.U @ torch.diag(d.S) @ d.Vh, B @ A, rtol=0, atol=2e-5 * float(ref[0]))
    torch.testing.assert_close(d.U.T @ d.U, torch.eye(d.U.shape[1]), rtol=0, atol=1e-5)


def _decaying(m, n, seed, decay=0.9):
    g = _gen(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g)).Q
    s = torch.tensor([decay**i for i in range(min(m, n))])
    return (U * s) @ V.T, s


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_truncated_svd_is_near_optimal(method):
    M, s = _decaying(600, 400, 3)
    k = 20
    d, kk = dc.truncated_svd(M, rank=k, method=method)
    assert kk == k and d.method == method
    B, A = d.factors(k)
    err = float(torch.linalg.matrix_norm(M - B @ A))
    opt = float(s[k:].pow(2).sum().sqrt())
    # Eckart–Young optimum; the randomized sketch (oversampling 10, 2 power iterations) must be within 1%
    assert opt <= err * (1 + 1e-5)
    assert err <= opt * (1.01 if method == "randomized" else 1 + 1e-4)


def test_auto_picks_randomized_only_for_big_matrices():
    assert dc.choose_method((4096, 4096), 32) == "randomized"
    assert dc.choose_method((64, 128), 8) == "full"
    assert dc.choose_method((4096, 4096), 2000) == "full"


def test_rank_for_energy_is_the_smallest_sufficient_rank():
    S = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1])
    s2 = S.pow(2)
    for e in (0.1, 0.5, 0.8, 0.95, 0.99, 0.9999, 1.0):
        k = dc.rank_for_energy(S, e)
        assert float(s2[:k].sum()) >= e * float(s2.sum()) * (1 - 1e-12)
        assert k == 1 or float(s2[: k - 1].sum()) < e * float(s2.sum())


def test_energy_with_randomized_grows_the_sketch():
    M, s = _decaying(800, 600, 5, decay=0.97)
    d, k = dc.truncated_svd(M, energy=0.99, method="auto")
    want = dc.rank_for_energy(s, 0.99)
    assert abs(k - want) <= 1, (k, want)


def test_effective_rank():
    assert dc.effective_rank(torch.ones(7)) == pytest.approx(7)
    assert dc.effective_rank(torch.tensor([3.0, 0, 0])) == pytest.approx(1)


@pytest.mark.filterwarnings("ignore:The density")
def test_ties_matches_peft_with_equal_weights():
    from peft.utils.merge_utils import ties

    g = _gen(11)
    ts = [torch.randn(30, 40, generator=g) for _ in range(3)]
    w = [0.5, 0.5, 0.5]
    for density in (0.2, 0.5, 1.0):
        ours = dc.ties_merge(ts, w, density)
        ref = ties(ts, torch.tensor(w), density, "total")
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_ties_single_task_and_sign_election():
    t = torch.tensor([[1.0, -2.0], [3.0, -0.5]])
    torch.testing.assert_close(dc.ties_merge([t], [2.0], 1.0), 2 * t)
    a = torch.tensor([1.0, 1.0, -1.0])
    b = torch.tensor([-3.0, 2.0, -1.0])
    # entry 0: mass -2 elects '-', only b agrees → -3; entry 1: both + → mean 1.5; entry 2: both − → −1
    torch.testing.assert_close(dc.ties_merge([a, b], [1.0, 1.0], 1.0), torch.tensor([-3.0, 1.5, -1.0]))


def test_dare_density_one_is_the_weighted_sum_and_seeds_are_reproducible():
    g = _gen(2)
    ts = [torch.randn(50, 60, generator=g) for _ in range(2)]
    w = [0.7, 0.3]
    torch.testing.assert_close(dc.dare_merge(ts, w, 1.0, [1, 2]), 0.7 * ts[0] + 0.3 * ts[1])
    x = dc.dare_merge(ts, w, 0.4, [1, 2])
    torch.testing.assert_close(x, dc.dare_merge(ts, w, 0.4, [1, 2]), rtol=0, atol=0)
    assert not torch.equal(x, dc.dare_merge(ts, w, 0.4, [3, 4]))


def test_dare_drops_at_the_stated_rate_and_is_unbiased():
    t = torch.ones(200, 200)
    density = 0.3
    x = dc.dare_merge([t], [1.0], density, [7])
    kept = float((x != 0).float().mean())
    n = t.numel()
    assert abs(kept - density) < 5 * math.sqrt(density * (1 - density) / n)
    torch.testing.assert_close(x[x != 0], torch.full_like(x[x != 0], 1 / density))
    # E[DARE] = the task vector: the mean over many seeds converges
    g = _gen(9)
    v = torch.randn(40, 40, generator=g)
    mean = sum(dc.dare_merge([v], [1.0], 0.5, [s]) for s in range(400)) / 400
    # per entry std of the mean is |v|·sqrt((1-p)/p/400) = |v|/20
    assert float(((mean - v).abs() / v.abs().clamp(min=1e-3)).median()) < 0.1


def test_layer_seed_depends_on_layer_not_order():
    assert dc.layer_seed(0, 1, "a.weight") == dc.layer_seed(0, 1, "a.weight")
    assert dc.layer_seed(0, 1, "a.weight") != dc.layer_seed(0, 0, "a.weight")
    assert dc.layer_seed(0, 1, "a.weight") != dc.layer_seed(1, 1, "a.weight")


def test_lowrank_error_without_forming_products():
    g = _gen(4)
    B1, A1 = torch.randn(60, 5, generator=g), torch.randn(5, 80, generator=g)
    B2, A2 = B1 + 1e-3 * torch.randn(60, 5, generator=g), A1.clone()
    dense = float(torch.linalg.vector_norm((B1 @ A1 - B2 @ A2).double()) / torch.linalg.vector_norm((B1 @ A1).double()))
    assert dc.lowrank_rel_error(B1, A1, B2, A2) == pytest.approx(dense, rel=1e-4)
    assert dc.product_norm(B1, A1) == pytest.approx(float(torch.linalg.vector_norm(B1 @ A1)), rel=1e-5)
    assert dc.lowrank_rel_error(B1, A1, B1, A1) < 1e-6


@pytest.mark.gpu
def test_cuda_gives_the_cpu_results():
    """Same math on the GPU: spectra and truncations agree to fp32 rounding, DARE masks are identical
    (drawn on the CPU), randomized sketches reach the same (near-optimal) error."""
    g = _gen(21)
    B, A = torch.randn(300, 12, generator=g), torch.randn(12, 500, generator=g)
    c, d = dc.lowrank_svd(B, A), dc.lowrank_svd(B.cuda(), A.cuda())
    torch.testing.assert_close(d.S.cpu(), c.S, rtol=1e-5, atol=1e-5 * float(c.S[0]))
    M, s = _decaying(700, 500, 8)
    for method in ("full", "randomized"):
        (dcpu, k1), (dgpu, k2) = dc.truncated_svd(M, rank=16, method=method), dc.truncated_svd(M.cuda(), rank=16,
                                                                                                method=method)
        e1 = dc.relative_error(M, torch.matmul(*dcpu.factors(k1)))
        e2 = dc.relative_error(M.cuda(), torch.matmul(*dgpu.factors(k2)))
        assert k1 == k2 and e2 == pytest.approx(e1, rel=1e-2)
    ts = [torch.randn(40, 30, generator=g) for _ in range(2)]
    torch.testing.assert_close(dc.dare_merge([t.cuda() for t in ts], [0.7, 0.3], 0.5, [1, 2]).cpu(),
                               dc.dare_merge(ts, [0.7, 0.3], 0.5, [1, 2]))
    torch.testing.assert_close(dc.ties_merge([t.cuda() for t in ts], [1.0, 1.0], 0.3).cpu(),
                               dc.ties_merge(ts, [1.0, 1.0], 0.3))
