"""Delta kinds of PEFT's own methods that neither LoRA nor LyCORIS has: orthogonal rotations (OFT, BOFT),
VeRA's scaled shared projections and MiSS / Bone blocks. LoHa, LoKr, IA³ and AdaLoRA reuse the LoRA and
LyCORIS classes (the math is the same; see formats/peft.md).

Shapes (W [out, in], as nn.Linear stores it):
* OFT / BOFT: W' = (W @ Rᵀ) ⊙ s, R = block_diag(R₁ … R_n) [in, in] of orthogonal b×b blocks, s [out, 1] (BOFT's
  learned output scale; 1 for OFT). ΔW = W' − W depends on W.
* VeRA: ΔW = (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]) — a LoRA once the base says `in` (A and B are shared by every
  layer, sized for the largest one), so it resolves into a `LoraDelta` at plan time.
* MiSS / Bone: "tile": ΔW[o, j] = block[j mod r, o] (independent of W; "mini" repeats a [r, mini_r] block along
  the outputs first); "bat": W' = W + (W_blocks @ block + block) over r×r tiles, which depends on W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from loraport.adapter import Delta, LoraDelta, Shape
from loraport.errors import PlanError


def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def _refuse_shape(d: Delta, have: Shape, why: str) -> PlanError:
    return PlanError(f"shape mismatch for {d.target}: {d.kind} entry {d.source_key or '?'} {why}, base tensor is "
                     f"{list(have)}")


@dataclass
class OrthoDelta(Delta):
    """OFT / BOFT: W' = (W @ Rᵀ) ⊙ s. `blocks` [n, b, b] are the orthogonal blocks of R in fp32 (n = 1 with
    block sharing: repeated over the input); `out_scale` [out, 1] is BOFT's s (None for OFT)."""

    blocks: torch.Tensor = None  # type: ignore[assignment]
    out_scale: torch.Tensor | None = None
    shared: bool = False  # one block repeated over every input group (OFT block_share)
    params: int = 0  # trainable parameters as stored (the rotation is derived from them)
    method: str = "oft"

    kind: ClassVar[str] = "oft"

    @property
    def variant(self) -> str:
        return self.method

    def _groups(self, n_in: int) -> int:
        return n_in // self.blocks.shape[-1] if self.shared else self.blocks.shape[0]

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        have = self._sliced(base_shape)
        b = self.blocks.shape[-1]
        if len(have) != 2 or hint == "conv1d":
            raise _refuse_shape(self, have, "rotates the inputs of a Linear layer [out, in] (conv and Conv1D "
                                "targets of OFT/BOFT are not supported)")
        if have[1] != self._groups(have[1]) * b or (self.shared and have[1] % b):
            raise _refuse_shape(self, have, f"has {self._groups(have[1])} rotation block(s) of {b}")
        if self.out_scale is not None and self.out_scale.numel() != have[0]:
            raise _refuse_shape(self, have, f"scales {self.out_scale.numel()} outputs")
        return self

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        out, n_in = W.shape
        b = self.blocks.shape[-1]
        R = _f32(self.blocks, W.device)
        if self.shared:
            R = R.expand(n_in // b, b, b)
        # (W @ Rᵀ)[o, g·b + c] = Σ_k W[o, g·b + k] · R_g[c, k]
        merged = torch.einsum("ogk,gck->ogc", W.reshape(out, -1, b), R).reshape(out, n_in)
        if self.out_scale is not None:
            merged.mul_(_f32(self.out_scale, W.device).reshape(out, 1))
        return merged.sub_(W)

    @property
    def depends_on_base(self) -> bool:
        return True

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.blocks,)

    def rank(self) -> int | None:
        return int(self.blocks.shape[-1])  # the block size: what OFT's r trades against

    def num_params(self) -> int:
        return self.params

    def describe(self) -> dict:
        d = super().describe()
        d.update(method=self.method, block_size=int(self.blocks.shape[-1]), blocks=int(self.blocks.shape[0]),
                 shared=self.shared, scaled=self.out_scale is not None)
        return d


@dataclass
class VeraDelta(Delta):
    """VeRA: frozen shared projections A [r, max_in], B [max_out, r] and per-layer vectors λ_b [out], λ_d [r].
    The layer's `in` comes from the base, so `resolve` returns the equivalent `LoraDelta`."""

    A: torch.Tensor = None  # type: ignore[assignment]
    B: torch.Tensor = None  # type: ignore[assignment]
    lambda_b: torch.Tensor = None  # type: ignore[assignment]
    lambda_d: torch.Tensor = None  # type: ignore[assignment]

    kind: ClassVar[str] = "vera"

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        have = self._sliced(base_shape)
        if len(have) != 2:
            raise _refuse_shape(self, have, "updates a Linear or Conv1D weight")
        t = hint == "conv1d"
        out, n_in = (have[1], have[0]) if t else have
        if self.lambda_b.numel() != out or n_in > self.A.shape[1] or out > self.B.shape[0]:
            raise _refuse_shape(self, have, f"has {self.lambda_b.numel()} outputs and projections for at most "
                                f"{list(self.B.shape[:1]) + list(self.A.shape[1:])}")
        A = self.lambda_d.float().reshape(-1, 1) * self.A[:, :n_in].float()
        B = self.lambda_b.float().reshape(-1, 1) * self.B[:out].float()
        return LoraDelta(self.target, A=A, B=B, scale=1.0, transpose=t, alpha=None, scale_rule="vera",
                         layer="conv1d" if t else "linear", rows=self.rows, source_key=self.source_key)

    def rank(self) -> int | None:
        return int(self.lambda_d.numel())

    def num_params(self) -> int:
        return self.lambda_b.numel() + self.lambda_d.numel()  # the projections are frozen (shared, seeded)


@dataclass
class MissDelta(Delta):
    """MiSS / Bone. `mode` "tile" (block [r, out]), "mini" (block [r, mini_r], repeated over the outputs) or
    "bat" (block [out/r, r, r], applied to W's r×r tiles)."""

    block: torch.Tensor = None  # type: ignore[assignment]
    mode: str = "tile"
    method: str = "miss"

    kind: ClassVar[str] = "miss"

    @property
    def variant(self) -> str:
        return f"{self.method}-{self.mode}"

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        have = self._sliced(base_shape)
        if len(have) != 2 or hint == "conv1d":
            raise _refuse_shape(self, have, "updates a Linear weight [out, in]")
        out, n_in = have
        blk = tuple(self.block.shape)
        if self.mode == "bat":
            r = blk[-1]
            ok = out % r == 0 and n_in % r == 0 and blk == (out // r, r, r)
        elif self.mode == "mini":
            ok = out % blk[1] == 0
        else:
            ok = blk[1] == out
        if not ok:
            raise _refuse_shape(self, have, f"is a {self.mode} block {list(blk)}")
        return self

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        out, n_in = W.shape
        blk = _f32(self.block, W.device)
        if self.mode == "bat":
            r = blk.shape[-1]
            tiles = W.reshape(out // r, r, n_in // r, r).permute(2, 0, 1, 3)
            d = (tiles @ blk + blk).permute(1, 2, 0, 3).reshape(out, n_in)
            return d
        if self.mode == "mini":
            blk = blk.repeat(1, out // blk.shape[1])
        r = blk.shape[0]
        reps = -(-n_in // r)
        return blk.t().repeat(1, reps)[:, :n_in].contiguous()

    @property
    def depends_on_base(self) -> bool:
        return True  # "bat" on W's values; "tile" / "mini" on its shape (the input width is not stored)

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.block,)

    def rank(self) -> int | None:
        return int(self.block.shape[-1] if self.mode == "bat" else self.block.shape[0])

    def num_params(self) -> int:
        return self.block.numel()


# --------------------------------------------------------------------------------------- rotation math
def _skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """[n, b(b-1)/2] upper-triangle entries -> [n, b, b] skew-symmetric matrices (PEFT's OFT layout)."""
    rows, cols = torch.triu_indices(b, b, 1)
    m = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def block_size_of(n_elements: int) -> int | None:
    """b with b(b-1)/2 = n_elements, or None."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements and b > 0 else None


def coft_project(vec: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """Constrained OFT: each block's skew matrix Q is pulled back to ‖Q‖ ≤ eps/√n (PEFT's _project_batch)."""
    q = _skew(vec, b)
    lim = eps / math.sqrt(q.shape[0])
    norm = torch.linalg.vector_norm(q, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= lim, q, lim * (q / norm))
    rows, cols = torch.triu_indices(b, b, 1)
    return out[:, rows, cols]


def cayley(q: torch.Tensor) -> torch.Tensor:
    """(I − Q)(I + Q)⁻¹ for a batch of skew-symmetric Q (exactly orthogonal)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated Neumann form of the Cayley transform: I + 2Q + 2Q² + … + Q^(terms−1)."""
    r = torch.eye(q.shape[-1], dtype=q.dtype).repeat(q.shape[0], 1, 1)
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            power = torch.bmm(power, q)
            r.add_(power)
    return r


def oft_blocks(weight: torch.Tensor, b: int, *, neumann: bool, terms: int, coft: bool, eps: float) -> torch.Tensor:
    """OFT's rotation blocks [n, b, b] from its stored parameters [n, b(b-1)/2], in fp32."""
    vec = weight.float()
    if coft:
        vec = coft_project(vec, b, eps)
    q = _skew(vec, b)
    return cayley_neumann(q, terms) if neumann else cayley(q)


def boft_blocks(R: torch.Tensor) -> torch.Tensor:
    """BOFT's rotation blocks [D, H, H] from boft_R [1, D, H, H]: the Cayley transform of (R − Rᵀ)/2."""
    r = R.float().reshape(-1, R.shape[-1], R.shape[-1])
    return cayley(0.5 * (r - r.transpose(1, 2)))


def vera_projections(r: int, n_in: int, n_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared A [r, n_in] and B [n_out, r] as PEFT draws them when it did not save them: Kaiming-uniform
    (bound √6/√fan_in) from one CPU generator seeded with `projection_prng_key`, A first. Reproducible as long
    as torch's CPU generator is (PEFT's own reload relies on the same)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for shape in ((r, n_in), (n_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        out.append(torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=g))
    return out[0], out[1]
