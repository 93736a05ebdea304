"""The format-neutral adapter model: what every reader produces and every writer and the merge engine consume.

An `Adapter` is a list of `Delta`s, each naming the base tensor it changes (`target`, in the base checkpoint's
own naming once resolved) and able to produce its dense update for that tensor. Orientation and scale quirks
of the on-disk format are resolved by the reader; the few that need the base (GPT-2 Conv1D orientation,
square layers) are resolved at plan time by `Delta.resolve(base_shape, hint)`.

Conventions:
* factors are kept as loaded (CPU, stored dtype) and moved to the compute device / fp32 only when applied;
* `scale` is the resolved per-module multiplier (alpha/r, alpha/sqrt(r), an absolute scale ...);
* `contribution(W)` returns the fp32 update ΔW to *add* to W (so W' = W + Σ weight·ΔW), which for DoRA and IA³
  depends on W itself.

Capabilities (asked of a delta; nobody outside the delta classes probes with isinstance/getattr/kind lists):
* math: `dense(device, W)` (ΔW), the in-place `apply_(W, weight)` (one addmm_ for plain LoRA),
  `low_rank_factors()` (B, A, scale, orientation of a plain 2-D LoRA, else None; `plain_lora`),
  `thin_factors(device)` (matrix factors of any LoRA, Tucker folded in), `with_default_orientation()`;
* class flags: `replaces_base`, `factored` (LoRA/LoHa/LoKr), `has_lora_factors`, `stacked` (per-expert),
  `stores_dense`, `sets_values` (replacements, trained token rows), `widens` (deltas_widen.py); per instance:
  `has_magnitude` (DoRA), `depends_on_base`;
* vocabulary: `output_shape(base_shape)` (a replacement may resize a vocabulary), `replaced(W, w)` (W after a
  replacement, a new tensor when resized), `trained_rows()` (trained token rows), `same_update(other)` (tied
  head and embedding trained alike);
* description: `label`, `variant`, `scale_rule`, `layer_kind`, `stored_tensors()`, `named_tensors()`.

Size: over 400 lines on purpose: the base class states every capability once with its default, next to the LoRA,
full and replacement classes that override them; LyCORIS, expert and token-row deltas live in deltas_*.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, NamedTuple

import torch

from loraport.errors import PlanError
from loraport.names.llm import is_embedding

Shape = tuple[int, ...]


class LowRank(NamedTuple):
    """The plain 2-D LoRA form of a delta: ΔW = scale·B@A, stored transposed ((B@A)ᵀ) when `transpose`
    (None: not decided yet, see `Delta.resolve`)."""

    B: torch.Tensor  # [out, r]
    A: torch.Tensor  # [r, in]
    scale: float
    transpose: bool | None


@dataclass
class Delta:
    """Base class. `target` is the base tensor name; `rows` optionally restricts the update to a row slice
    [start, stop) of the target (fused projections such as CLIP's in_proj_weight)."""

    target: str
    rows: tuple[int, int] | None = field(default=None, kw_only=True)
    source_key: str = field(default="", kw_only=True)  # the adapter key it came from, for messages

    kind: ClassVar[str] = "delta"
    replaces_base: ClassVar[bool] = False  # the update replaces the target (the others then apply on top of it)
    factored: ClassVar[bool] = False  # stored as factors of a larger matrix (LoRA, LoHa, LoKr): for compression
    stacked: ClassVar[bool] = False  # updates a stacked [E, out, in] expert tensor: already low rank per expert
    has_lora_factors: ClassVar[bool] = False  # B, A (+ Tucker core, DoRA magnitude): see `thin_factors`
    stores_dense: ClassVar[bool] = False  # holds ΔW itself (a dense diff)
    sets_values: ClassVar[bool] = False  # sets trained values (a replacement, trained token rows) instead of adding ΔW
    widens: ClassVar[bool] = False  # gives the target more input columns (a control LoRA's input projection)

    # --- capabilities ------------------------------------------------------------------------------
    def low_rank_factors(self) -> LowRank | None:
        """(B, A, scale, transpose) when this delta is a plain 2-D LoRA (no DoRA, no Tucker core, no conv
        kernel), else None. Row slices are the caller's business (`rows`)."""
        return None

    def is_zero(self) -> bool:
        """True when the update is exactly nothing (a part of a fused LoRA that the training never touched)."""
        return False

    def output_rows(self, start: int, stop: int) -> Delta | None:
        """The update to output rows [start, stop) alone (a LoRA on a fused projection split into the separate
        tensors of another layout), or None when this kind cannot be cut by rows exactly."""
        return None

    def input_padded(self, columns: int) -> Delta | None:
        """The same update on a weight widened to `columns` input columns, the new ones left alone (a LoRA
        trained on Flux.1-dev merged into a control model's wider img_in), or None when this kind cannot say."""
        return None

    @classmethod
    def from_row_parts(cls, parts: list[tuple[Delta, tuple[int, int]]], total: int) -> Delta | None:
        """One update of this kind on a tensor of `total` rows whose rows [a, b) are each part's update (rows no
        part covers: zero), or None when the kind cannot hold them exactly (the writer of a fused module)."""
        return None

    @property
    def plain_lora(self) -> bool:
        return self.low_rank_factors() is not None

    @property
    def has_magnitude(self) -> bool:
        """DoRA: a learned magnitude rescales W + ΔW."""
        return False

    @property
    def label(self) -> str:
        """What to call this update in messages and reports ("DoRA" for a LoRA with a magnitude)."""
        return self.kind

    @property
    def variant(self) -> str:
        """The kind refined by its options, for spectra ("dora", "lora-tucker" ...)."""
        return self.kind

    @property
    def scale_rule(self) -> str:
        """How its scale was derived (alpha/r, alpha/sqrt(r) ...); the kind when the format has no rule."""
        return self.kind

    @property
    def layer_kind(self) -> str | None:
        """The layer the target belongs to when the format says ("linear", "embedding", "conv1d", "conv")."""
        return None

    def with_default_orientation(self) -> Delta:
        """A copy whose orientation is decided without a base (from its layer kind or target name)."""
        return self

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        """The principal tensors as stored (for dtype reports)."""
        return ()

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(field name, tensor) for every tensor field, for the NaN/Inf check."""
        return [(k, v) for k, v in vars(self).items() if isinstance(v, torch.Tensor)]

    def thin_factors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B [out, r], A [r, n]) in fp32 with B@A = scale·ΔW as a matrix in the delta's own frame (B@A before
        any transpose, conv kernels flattened, a Tucker core folded in; DoRA: the direction update), or None
        when the delta has no LoRA factors (`has_lora_factors`)."""
        return None

    def dense(self, device: torch.device | str, W: torch.Tensor | None = None) -> torch.Tensor | None:
        """ΔW in fp32 on `device` in the target's orientation: against W (the fp32 row slice of the base, needed
        when `depends_on_base`), else against zeros of the shape the delta implies (None if it cannot say)."""
        if W is None:
            d = self.with_default_orientation()
            shape = d.implied_shape()
            if shape is None:
                return None
            return d.contribution(torch.zeros(shape, dtype=torch.float32, device=device))
        return self.contribution(W)

    # --- plan time -------------------------------------------------------------------------------
    def implied_shape(self) -> Shape | None:
        """The shape of the (row-sliced) target this delta implies, or None if it cannot say."""
        return None

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        """Return a copy whose orientation is fixed for a target of `base_shape`, or raise PlanError.
        `hint` is the checkpoint's layer kind for the target ("conv1d" for GPT-2 style, else None)."""
        want = self.implied_shape()
        have = self._sliced(base_shape)
        if want is not None and tuple(want) != tuple(have):
            raise PlanError(
                f"shape mismatch for {self.target}: adapter key {self.source_key or '?'} implies "
                f"{list(want)}, base tensor is {list(have)}"
            )
        return self

    def output_shape(self, base_shape: Shape) -> Shape:
        """The target's shape after this update: the base's, unless the update resizes it (a vocabulary)."""
        return tuple(base_shape)

    def trained_rows(self) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """(row indices, their trained values) for an update that sets a few rows (PEFT trainable tokens)."""
        return None

    def same_update(self, other: Delta) -> bool:
        """True when `other` makes exactly this update (same kind, fields and tensors), whatever its target: how a
        tied head and embedding trained together are recognised."""
        if type(self) is not type(other):
            return False
        b = vars(other)
        for k, v in vars(self).items():
            if k in ("target", "source_key"):
                continue
            w = b.get(k)
            if isinstance(v, torch.Tensor):
                if not (isinstance(w, torch.Tensor) and v.shape == w.shape and torch.equal(v, w)):
                    return False
            elif v != w:
                return False
        return True

    def _sliced(self, base_shape: Shape) -> Shape:
        if self.rows is None:
            return tuple(base_shape)
        return (self.rows[1] - self.rows[0], *base_shape[1:])

    # --- compute ---------------------------------------------------------------------------------
    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        """fp32 ΔW for (the row slice of) W, on W's device. W is fp32 and must not be modified."""
        raise NotImplementedError

    def apply_(self, W: torch.Tensor, weight: float = 1.0, base: torch.Tensor | None = None) -> None:
        """W += weight·ΔW in place. `base` is the unmodified base tensor (for W-dependent deltas) when
        W already carries other updates; defaults to W itself."""
        ref = W if base is None else base
        if self.rows is not None:
            a, b = self.rows
            W[a:b].add_(self.contribution(ref[a:b]), alpha=weight)
        else:
            W.add_(self.contribution(ref), alpha=weight)

    def replaced(self, W: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """W after this update applied first (`replaces_base`): W itself, updated in place, unless the update
        gives the tensor another shape (a resized vocabulary), then a new fp32 tensor on W's device."""
        self.apply_(W, weight)
        return W

    @property
    def depends_on_base(self) -> bool:
        return False

    # --- description -----------------------------------------------------------------------------
    def num_params(self) -> int:
        return 0

    def rank(self) -> int | None:
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "target": self.target, "rank": self.rank(), "params": self.num_params()}


def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32, non_blocking=True)


@dataclass
class LoraDelta(Delta):
    """ΔW = scale · (B @ A), optionally transposed, reshaped to a conv kernel, with Tucker `mid` and DoRA.

    A: [r, in] (conv: [r, in, kh, kw]); B: [out, r] (conv: [out, r, 1, 1]).
    transpose: the target stores (B@A)ᵀ (PEFT embeddings, GPT-2 Conv1D). None = decide at plan time from the
      base (layer hint, then shape).
    mid: Tucker core [r, r, kh, kw] (LyCORIS/kohya `lora_mid`): ΔW[o,i,h,w] = Σ B[o,a]·mid[a,b,h,w]·A[b,i].
    magnitude / dora_axis: DoRA. `dora_axis` says which axis of B@A the magnitude indexes: "out" (PEFT, MLX,
      torchtune, LyCORIS ≥3.2) or "in" (older LyCORIS / kohya). W' = m/‖W+ΔW‖ ⊙ (W+ΔW), norm over the other axes.
    """

    A: torch.Tensor = None  # type: ignore[assignment]
    B: torch.Tensor = None  # type: ignore[assignment]
    scale: float = 1.0
    transpose: bool | None = False
    mid: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    dora_axis: str = "out"
    dora_eps: float = 0.0
    alpha: float | None = None  # as stored, for inspect/writers; scale is what the math uses
    scale_rule: str = "alpha/r"
    layer: str | None = None  # "linear" | "embedding" | "conv1d" | "conv": what the writer must name it

    kind: ClassVar[str] = "lora"
    factored: ClassVar[bool] = True
    has_lora_factors: ClassVar[bool] = True

    def __post_init__(self):
        if self.A is None or self.B is None:
            raise PlanError(f"LoRA factors missing for {self.target}")

    # capabilities -------------------------------------------------------------------------------
    def low_rank_factors(self) -> LowRank | None:
        if self.magnitude is None and self.mid is None and self.A.dim() == 2 and self.B.dim() == 2:
            return LowRank(self.B, self.A, self.scale, self.transpose)
        return None

    def is_zero(self) -> bool:
        return self.magnitude is None and not bool(self.B.any())

    def output_rows(self, start: int, stop: int) -> Delta | None:
        """B's rows [start, stop) with the shared A; the columns of B that are all zero there (sd-scripts'
        split_qkv stores q, k, v as blocks of one rank-3r LoRA) dropped with their rows of A. DoRA on the
        output axis is per row, so its magnitude is cut the same way."""
        if self.mid is not None or self.B.dim() != 2 or (self.magnitude is not None and self.dora_axis != "out"):
            return None
        B, A = self.B[start:stop], self.A
        keep = B.ne(0).any(dim=0)
        if keep.any() and not keep.all():
            B, A = B[:, keep], A[keep]
        mag = None if self.magnitude is None else self.magnitude.reshape(-1)[start:stop]
        return replace(self, A=A.contiguous(), B=B.contiguous(), magnitude=mag)

    def input_padded(self, columns: int) -> Delta | None:
        """A with zero columns appended: B@A is unchanged on the old inputs and zero on the new ones."""
        if self.low_rank_factors() is None or self.transpose or self.A.shape[1] > columns:
            return None
        A = torch.zeros((self.A.shape[0], columns), dtype=self.A.dtype)
        A[:, : self.A.shape[1]] = self.A
        return replace(self, A=A)

    @property
    def has_magnitude(self) -> bool:
        return self.magnitude is not None

    @property
    def label(self) -> str:
        return "DoRA" if self.magnitude is not None else self.kind

    @property
    def variant(self) -> str:
        return "dora" if self.magnitude is not None else ("lora-tucker" if self.mid is not None else "lora")

    @property
    def layer_kind(self) -> str | None:
        return self.layer

    def with_default_orientation(self) -> Delta:
        if self.transpose is not None:
            return self
        t = self.layer in ("embedding", "conv1d") or (self.layer is None and is_embedding(self.target))
        return replace(self, transpose=t)

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.A, self.B)

    def thin_factors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        B = self.B.to(device=device, dtype=torch.float32).reshape(self.B.shape[0], -1)
        A = self.A.to(device=device, dtype=torch.float32)
        if self.mid is not None:
            mid = self.mid.to(device=device, dtype=torch.float32)
            A = torch.einsum("ab...,bi->ai...", mid, A.reshape(A.shape[0], -1)).reshape(mid.shape[0], -1)
        else:
            A = A.reshape(A.shape[0], -1)
        return B, A * self.scale

    # shapes -------------------------------------------------------------------------------------
    def _product_shape(self) -> Shape:
        """Shape of B@A before any transpose (conv: the full kernel shape)."""
        out = self.B.shape[0]
        if self.A.dim() > 2:  # conv: [r, in, kh, kw]
            if self.mid is not None:
                return (out, self.A.shape[1], *self.mid.shape[2:])
            return (out, *self.A.shape[1:])
        if self.mid is not None and self.mid.dim() > 2:
            return (out, self.A.shape[1], *self.mid.shape[2:])
        return (out, self.A.shape[1])

    def implied_shape(self) -> Shape | None:
        s = self._product_shape()
        if self.transpose:
            return (s[1], s[0], *s[2:])
        return s

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        have = self._sliced(base_shape)
        prod = self._product_shape()
        straight = tuple(prod)
        flipped = (prod[1], prod[0], *prod[2:])
        t = self.transpose
        if t is None:
            if hint == "conv1d" and len(prod) == 2:
                t = True
            elif have == straight:
                t = False
            elif have == flipped:
                t = True
            else:
                t = False
        want = flipped if t else straight
        # a 1x1 conv base may be stored 2-D or 4-D: accept both when the element counts agree
        if have != want and not (
            len(prod) in (2, 4) and math.prod(have) == math.prod(want) and _squeeze11(have) == _squeeze11(want)
        ):
            raise PlanError(
                f"shape mismatch for {self.target}: adapter key {self.source_key or '?'} implies "
                f"{list(want)}, base tensor is {list(have)}"
            )
        layer = self.layer or ("conv1d" if t and hint == "conv1d" else "conv" if len(prod) > 2 else "linear")
        return replace(self, transpose=t, layer=layer)

    # math -----------------------------------------------------------------------------------------
    def product(self, device: torch.device) -> torch.Tensor:
        """scale·B@A in fp32 with the orientation of B@A (not transposed), kernel-shaped for convs."""
        A = _f32(self.A, device)
        B = _f32(self.B, device)
        out, r = B.shape[0], B.shape[1]
        if self.mid is not None:
            mid = _f32(self.mid, device)
            # ΔW[o,i,...] = Σ_ab B[o,a] mid[a,b,...] A[b,i]
            d = torch.einsum("ab...,oa,bi->oi...", mid, B.reshape(out, -1), A.reshape(A.shape[0], -1))
        else:
            d = (B.reshape(out, r) @ A.reshape(A.shape[0], -1)).reshape(self._product_shape())
        if self.scale != 1.0:
            d.mul_(self.scale)
        return d

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        return oriented_contribution(W, self.product(W.device), self.transpose, self.magnitude, self.dora_axis,
                                     self.dora_eps)

    def apply_(self, W: torch.Tensor, weight: float = 1.0, base: torch.Tensor | None = None) -> None:
        f = self.low_rank_factors()
        if f is None or W.dim() != 2:
            return super().apply_(W, weight, base)
        # fast path: W += (weight·scale) · B@A with one fused addmm_, no ΔW temporary beyond the GEMM
        tgt = W if self.rows is None else W[self.rows[0] : self.rows[1]]
        A = _f32(f.A, W.device)
        B = _f32(f.B, W.device)
        if f.transpose:
            tgt.addmm_(A.t(), B.t(), alpha=weight * f.scale)
        else:
            tgt.addmm_(B, A, alpha=weight * f.scale)

    @property
    def depends_on_base(self) -> bool:
        return self.magnitude is not None

    def rank(self) -> int | None:
        return int(self.A.shape[0])

    def num_params(self) -> int:
        n = self.A.numel() + self.B.numel()
        n += 0 if self.mid is None else self.mid.numel()
        n += 0 if self.magnitude is None else self.magnitude.numel()
        return n

    def describe(self) -> dict:
        d = super().describe()
        d.update(scale=self.scale, alpha=self.alpha, scale_rule=self.scale_rule, dora=self.magnitude is not None)
        if self.mid is not None:
            d["tucker"] = True
        return d


def _squeeze11(shape: Shape) -> Shape:
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


def oriented_contribution(W: torch.Tensor, product: torch.Tensor, transpose: bool | None,
                          magnitude: torch.Tensor | None, dora_axis: str = "out", eps: float = 0.0) -> torch.Tensor:
    """The update for W from a factored product shaped like B@A (conv kernels possibly flattened): transposed
    when the target stores it so, reshaped to W, and turned into a DoRA update when there is a magnitude.
    `dora_axis` names the axis of B@A the magnitude indexes ("out" rows or "in" columns)."""
    d = product.transpose(0, 1) if transpose else product
    d = d.reshape(W.shape)
    if magnitude is None:
        return d
    axis = 0 if dora_axis == "out" else 1
    return dora_contribution(W, d, magnitude, 1 - axis if transpose else axis, eps)


def dora_contribution(W: torch.Tensor, d: torch.Tensor, magnitude: torch.Tensor, dim: int, eps: float = 0.0):
    """ΔW such that W + ΔW = m/‖W+d‖ ⊙ (W+d), the norm taken over every axis except `dim` (PEFT's DoRA merge)."""
    merged = W + d
    other = [i for i in range(merged.dim()) if i != dim]
    norm = torch.linalg.vector_norm(merged, dim=other, keepdim=True)
    if eps:
        norm = norm + eps
    view = [1] * merged.dim()
    view[dim] = -1
    m = magnitude.to(device=W.device, dtype=torch.float32).reshape(view)
    return merged.mul_(m / norm).sub_(W)


@dataclass
class FullDelta(Delta):
    """A dense difference ΔW (LyCORIS full/diff, bias diffs), times `scale`."""

    diff: torch.Tensor = None  # type: ignore[assignment]
    scale: float = 1.0
    kind: ClassVar[str] = "full"
    stores_dense: ClassVar[bool] = True

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.diff,)

    def implied_shape(self) -> Shape | None:
        return tuple(self.diff.shape)

    def output_rows(self, start: int, stop: int) -> Delta | None:
        return replace(self, diff=self.diff[start:stop].contiguous())

    @classmethod
    def from_row_parts(cls, parts: list[tuple[Delta, tuple[int, int]]], total: int) -> Delta | None:
        """The parts' diffs (scales folded in) at their rows of one zero diff."""
        if not all(type(d) is cls and d.rows is None for d, _ in parts):
            return None
        d0 = parts[0][0]
        diff = torch.zeros(total, *d0.diff.shape[1:], dtype=torch.float32)
        for d, (a, b) in parts:
            if tuple(d.diff.shape) != (b - a, *d0.diff.shape[1:]):
                return None
            diff[a:b] = d.diff.float() * d.scale
        return replace(d0, diff=diff, scale=1.0, rows=None)

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        d = _f32(self.diff, W.device).reshape(W.shape)
        return d * self.scale if self.scale != 1.0 else d.clone()

    def num_params(self) -> int:
        return self.diff.numel()


@dataclass
class ReplaceDelta(Delta):
    """A full replacement of the target (PEFT `modules_to_save`, resized embeddings). With weight w the result
    is W + w·(R − W), so w = 1 replaces exactly."""

    value: torch.Tensor = None  # type: ignore[assignment]
    saved_base: bool = False  # a copy of the base layer saved alongside (PEFT save_embedding_layers): not trained
    kind: ClassVar[str] = "replace"
    replaces_base: ClassVar[bool] = True
    sets_values: ClassVar[bool] = True

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.value,)

    def implied_shape(self) -> Shape | None:
        return tuple(self.value.shape)

    def resizes(self, base_shape: Shape) -> bool:
        """True when the value has another number of rows than the base, the rest alike: a vocabulary resized
        before training (`resize_token_embeddings`). Whether that is allowed is the plan's rule."""
        v, b = tuple(self.value.shape), tuple(base_shape)
        return self.rows is None and len(v) == len(b) >= 1 and v[1:] == b[1:] and v[0] != b[0]

    def output_shape(self, base_shape: Shape) -> Shape:
        return tuple(self.value.shape) if self.resizes(base_shape) else tuple(base_shape)

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        if self.resizes(base_shape):
            return self
        return super().resolve(base_shape, hint)

    def replaced(self, W: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        if tuple(W.shape) != tuple(self.value.shape):  # a resized vocabulary (weight 1: the plan's rule)
            return self.value.to(device=W.device, dtype=torch.float32, copy=True)
        return super().replaced(W, weight)

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        return _f32(self.value, W.device).reshape(W.shape) - W

    @property
    def depends_on_base(self) -> bool:
        return True

    def num_params(self) -> int:
        return 0 if self.saved_base else self.value.numel()


@dataclass
class Adapter:
    """A loaded adapter: its deltas plus what we know about where it came from."""

    deltas: list[Delta]
    format: str
    path: str = ""
    config: dict = field(default_factory=dict)  # the raw config we read (PEFT adapter_config.json, ...)
    metadata: dict = field(default_factory=dict)  # file metadata (safetensors __metadata__, GGUF KV, ...)
    notes: list[str] = field(default_factory=list)  # quirks worth telling a user ("alpha missing: scale 1")
    warnings: list[str] = field(default_factory=list)  # what a merge must say out loud (semantics changed)
    files: list[str] = field(default_factory=list)  # the files read, for provenance hashes
    name: str = ""
    family: dict | None = None  # a DiT adapter: its family, the dialects it spells, the base layouts it fits

    def __post_init__(self):
        seen: dict[tuple, str] = {}
        for d in self.deltas:
            key = (d.target, d.rows, d.replaces_base)  # a replacement may sit under a LoRA (PEFT base_layer)
            if key in seen:
                raise PlanError(
                    f"adapter {self.path or self.name}: two entries update {d.target}"
                    f" ({seen[key] or '?'} and {d.source_key or '?'})"
                )
            seen[key] = d.source_key

    @property
    def targets(self) -> list[str]:
        return [d.target for d in self.deltas]

    def num_params(self) -> int:
        return sum(d.num_params() for d in self.deltas)

    def ranks(self) -> list[int]:
        return sorted({r for d in self.deltas if (r := d.rank()) is not None})

    def kinds(self) -> list[str]:
        return sorted({d.kind for d in self.deltas})

    def renamed(self, mapping: dict[str, str]) -> Adapter:
        """A copy whose targets are renamed through `mapping` (unmapped names are kept)."""
        ds = [replace(d, target=mapping.get(d.target, d.target)) for d in self.deltas]
        return replace(self, deltas=ds)
