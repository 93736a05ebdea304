"""Matrix decompositions behind `extract`, `resize`, `combine` and the spectrum report.

Pure functions of tensors: they run on whatever device and dtype their inputs live on (callers pick the
device once and pass tensors there) and never touch files.

* `truncated_svd`: the best rank-k approximation of a dense matrix (Eckart–Young), by a full
  `torch.linalg.svd` for small matrices or a randomized range finder (Halko, Martinsson & Tropp 2011:
  Gaussian sketch with oversampling, power iterations re-orthonormalized by QR) for big ones; the rank is
  fixed or the smallest that retains a fraction of the energy Σσ².
* `lowrank_svd`: the exact thin SVD of a product B·A from its thin factors (QR of B and Aᵀ, SVD of the small
  r×r core), so resizing and re-factorizing sums of LoRAs never forms the dense ΔW.
* `ties_merge` (Yadav et al. 2023, "TIES-Merging") and `dare_merge` (Yu et al. 2023, "Language Models are
  Super Mario", drop-and-rescale) on dense per-layer deltas.
* Conv kernels [out, in, kh, kw] are handled as [out, in·kh·kw] matrices (`as_matrix` / `from_matrix`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

OVERSAMPLE = 10  # extra sketch columns beyond the wanted rank (Halko et al. recommend 5–10)
POWER_ITERS = 2  # subspace iterations: sharpen the sketch when the spectrum decays slowly
RANDOMIZED_MIN_DIM = 256  # below this a full SVD is cheap enough to be the better choice
RANDOMIZED_MAX_FRACTION = 1 / 4  # the sketch must be well below min(m, n) for the randomized method to pay


# --- shapes --------------------------------------------------------------------------------------
def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view of a weight: conv kernels [out, in, kh, kw] become [out, in·kh·kw]."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def from_matrix(m: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return m.reshape(shape)


# --- results -------------------------------------------------------------------------------------
@dataclass
class SVD:
    """Leading singular triplets M ≈ U·diag(S)·Vh. `method` says how they were computed; `total_sq` is
    ‖M‖_F² (all of the energy, also what a randomized sketch did not see)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    method: str
    total_sq: float

    def rank(self) -> int:
        return int(self.S.numel())

    def factors(self, k: int, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [m,k], A [k,n]) with B@A the rank-k truncation. balanced: √σ on both sides (keeps the two
        factors at the same scale, kinder to fp16/bf16 storage); else σ goes into B (kohya/PEFT style)."""
        k = min(k, self.rank())
        U, S, Vh = self.U[:, :k], self.S[:k], self.Vh[:k]
        if balanced:
            r = S.sqrt()
            return U * r, r[:, None] * Vh
        return U * S, Vh.clone()

    def tail_error(self, k: int) -> float:
        """‖M − M_k‖_F / ‖M‖_F from the singular values (exact when the spectrum is complete)."""
        if self.total_sq <= 0:
            return 0.0
        tail = float(self.S[k:].double().pow(2).sum())
        if self.method != "full" and self.method != "lowrank-qr":
            tail += max(self.total_sq - float(self.S.double().pow(2).sum()), 0.0)
        return math.sqrt(max(tail, 0.0) / self.total_sq)


def rank_for_energy(S: torch.Tensor, energy: float, total_sq: float | None = None) -> int:
    """Smallest k with Σ_{i<k} σᵢ² ≥ energy · total (total defaults to Σσ²); at least 1 when S has any
    mass. Returns len(S)+1 when the given singular values cannot reach the target (a sketch that saw too
    little)."""
    s2 = S.double().pow(2)
    total = float(s2.sum()) if total_sq is None else float(total_sq)
    if total <= 0 or S.numel() == 0:
        return 0
    cum = torch.cumsum(s2, 0)
    # a tiny slack so that energy=1.0 is reachable despite rounding of the running sum
    hit = torch.nonzero(cum >= energy * total * (1 - 1e-12), as_tuple=False)
    if hit.numel() == 0:
        return int(S.numel()) + 1
    return int(hit[0, 0]) + 1


def effective_rank(S: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = σ/Σσ: 1 for a rank-1 matrix, r for r equal σ."""
    s = S.double()
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


# --- dense SVDs ----------------------------------------------------------------------------------
def svd_full(M: torch.Tensor) -> SVD:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return SVD(U, S, Vh, "full", float(S.double().pow(2).sum()))


def svd_randomized(M: torch.Tensor, k: int, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS,
                   seed: int = 0) -> SVD:
    """Leading min(k+oversample, m, n) singular triplets of M by a seeded Gaussian range finder.

    Y = M·Ω (Ω n×l Gaussian), orthonormalized; `power_iters` rounds of Q ← qr(M·qr(Mᵀ·Q)) sharpen it; the
    small l×n matrix QᵀM is then decomposed exactly. The approximation is the orthogonal projection Q·QᵀM,
    so its error is ‖M‖² − Σσ² (kept in total_sq)."""
    m, n = M.shape
    l_ = min(k + oversample, m, n)
    g = torch.Generator(device=M.device)
    g.manual_seed(seed)
    omega = torch.randn(n, l_, generator=g, device=M.device, dtype=M.dtype)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(M.mT @ Q).Q
        Q = torch.linalg.qr(M @ Z).Q
    Uh, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    total = float(torch.linalg.vector_norm(M)) ** 2
    return SVD(Q @ Uh, S, Vh, "randomized", total)


def choose_method(shape: tuple[int, int], k: int, method: str = "auto", oversample: int = OVERSAMPLE) -> str:
    if method in ("full", "randomized"):
        return method
    small = min(shape)
    if small >= RANDOMIZED_MIN_DIM and k + oversample <= small * RANDOMIZED_MAX_FRACTION:
        return "randomized"
    return "full"


def truncated_svd(M: torch.Tensor, rank: int | None = None, energy: float | None = None,
                  max_rank: int | None = None, method: str = "auto", seed: int = 0,
                  oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS) -> tuple[SVD, int]:
    """(svd, k): the decomposition and the rank to keep, chosen as `rank` or by retained `energy`
    (capped by `max_rank`). With energy and the randomized method the sketch is doubled until it holds
    the requested energy (measured against the exact ‖M‖_F²) or a full SVD becomes the cheaper choice."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    full_rank = min(M.shape)
    cap = full_rank if max_rank is None else max(1, min(max_rank, full_rank))
    if rank is not None:
        k = max(1, min(rank, cap))
        how = choose_method(tuple(M.shape), k, method, oversample)
        d = svd_full(M) if how == "full" else svd_randomized(M, k, oversample, power_iters, seed)
        return d, min(k, d.rank())
    guess = min(cap, 32)
    while True:
        how = choose_method(tuple(M.shape), guess, method, oversample)
        if how == "full":
            d = svd_full(M)
            return d, min(max(rank_for_energy(d.S, energy), 1 if d.total_sq > 0 else 0), cap)
        d = svd_randomized(M, guess, oversample, power_iters, seed)
        k = rank_for_energy(d.S, energy, d.total_sq)
        if k <= guess or guess >= cap:
            return d, min(k, guess, cap)
        if method == "randomized" and guess * 2 + oversample > full_rank:
            return d, min(guess, cap)
        guess = min(guess * 2, cap)


# --- exact SVD of a thin product ------------------------------------------------------------------
def lowrank_svd(B: torch.Tensor, A: torch.Tensor) -> SVD:
    """Exact thin SVD of B @ A (B [m, r], A [r, n]) without forming it: B = Q_B R_B, Aᵀ = Q_A R_A,
    B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, and the small core R_B R_Aᵀ is decomposed densely. Cost O((m+n) r²)."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    return SVD(Qb @ Uc, S, Vhc @ Qa.mT, "lowrank-qr", float(S.double().pow(2).sum()))


def product_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B @ A‖_F from the thin factors: ‖R_B R_Aᵀ‖_F with B = Q_B R_B, Aᵀ = Q_A R_A."""
    Rb = torch.linalg.qr(B, mode="r").R
    Ra = torch.linalg.qr(A.mT, mode="r").R
    return float(torch.linalg.matrix_norm(Rb @ Ra.mT))


def lowrank_rel_error(B_ref: torch.Tensor, A_ref: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B_ref·A_ref − B·A‖_F / ‖B_ref·A_ref‖_F without forming either product (the difference is the
    product of [B_ref, −B] and [A_ref; A])."""
    den = product_norm(B_ref, A_ref)
    num = product_norm(torch.cat([B_ref, -B], 1), torch.cat([A_ref, A], 0))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def pick_rank(S: torch.Tensor, rank: int | None, energy: float | None, max_rank: int | None = None) -> int:
    """The rank to keep from a complete spectrum S."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    k = rank if rank is not None else rank_for_energy(S, energy)
    if max_rank is not None:
        k = min(k, max_rank)
    return max(0, min(k, int(S.numel())))


def relative_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """‖exact − approx‖_F / ‖exact‖_F (0 when both vanish)."""
    den = float(torch.linalg.vector_norm(exact.double()))
    num = float(torch.linalg.vector_norm((exact - approx).double()))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# --- TIES and DARE ---------------------------------------------------------------------------------
def trim_top(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the ⌊density·numel⌋ largest-magnitude entries, zero the rest."""
    if density >= 1:
        return t.clone()
    k = int(density * t.numel())
    flat = t.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        idx = torch.topk(flat.abs(), k, largest=True, sorted=False).indices
        out[idx] = flat[idx]
    return out.reshape(t.shape)


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-Merging of task vectors τₜ = wₜ·ΔWₜ (the weights scale each task vector, as the paper's λ
    scales the merged one): trim each to its top `density` entries by magnitude, elect the sign of the
    total mass Σₜ τ̂ₜ per entry (ties go to +), and average only the entries that agree with it (disjoint
    mean). With equal weights this is the paper's Algorithm 1 with λ = 1."""
    trimmed = torch.stack([trim_top(d * w, density) for d, w in zip(deltas, weights)])
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = (torch.sign(trimmed) == elected).to(trimmed.dtype)
    count = agree.sum(0).clamp_(min=1.0)
    return (trimmed * agree).sum(0) / count


def layer_seed(seed: int, index: int, name: str) -> int:
    """A per-(adapter, layer) seed derived from the user's seed, so that a layer's mask does not depend
    on which other layers are processed or in what order."""
    return zlib.crc32(f"{seed}:{index}:{name}".encode()) & 0x7FFFFFFF


def dare_mask(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """Bernoulli(density) keep-mask drawn on the CPU (identical on every device) from `seed`."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def dare_merge(deltas: list[torch.Tensor], weights: list[float], density: float, seeds: list[int]) -> torch.Tensor:
    """DARE (drop and rescale) then task arithmetic: each ΔWₜ keeps every entry independently with
    probability `density` (mask from seeds[t]) and is rescaled by 1/density, so E[result] = Σ wₜ·ΔWₜ."""
    if not 0 < density <= 1:
        raise ValueError("density must be in (0, 1]")
    out = torch.zeros_like(deltas[0])
    for d, w, s in zip(deltas, weights, seeds):
        if density >= 1:
            out.add_(d, alpha=w)
            continue
        mask = dare_mask(tuple(d.shape), density, s).to(d.device)
        out.add_(d * mask, alpha=w / density)
    return out
