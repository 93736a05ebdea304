"""LyCORIS delta kinds: LoHa (Hadamard product), LoKr (Kronecker product) and IA³ (learned channel scales).

The math is LyCORIS's *forward* path (the one ComfyUI and A1111 reproduce): the scale alpha/r is applied once.
(LyCORIS's own merge helper multiplies LoHa/LoKr by it twice; we do not copy that.)

Shapes (PyTorch order, W [out, in] or [out, in, kh, kw]):
* LoHa:  ΔW = s·(w1a @ w1b) ⊙ (w2a @ w2b), w?a [out, r], w?b [r, in·kh·kw];
         Tucker: ΔW = s·rebuild(t1, w1a, w1b) ⊙ rebuild(t2, w2a, w2b), t? [r, r, kh, kw], w?a [r, out], w?b [r, in],
         rebuild(t, a, b)[o, i, ...] = Σ_pq t[p, q, ...]·a[p, o]·b[q, i].
* LoKr:  ΔW = s·kron(w1, w2), w1 = lokr_w1 | w1a @ w1b  [out_l, in_m];
         w2 = lokr_w2 | w2a @ w2b [out_k, in_n(·kh·kw)] | rebuild(t2, w2a, w2b) [out_k, in_n, kh, kw].
* IA³:   W' = W ⊙ (1 + v) along the output axis (or the input axis when trained on the input): ΔW = W ⊙ v.
DoRA (`dora_scale`) on LoHa/LoKr: W' = m/‖W+ΔW‖ ⊙ (W+ΔW), the norm per output row or per input column.

Rows of the update (`output_rows`: one module's part of a fused tensor, or a half of Flux's swapped norm_out): a
LoHa's rows are a LoHa (its w?a rows); a LoKr's are not a Kronecker product, so they are a `RowPart`, which
builds the rows from the whole module's factors when applied (one module's rows at a time). Output-axis DoRA is
per row, so it is cut with them; input-axis DoRA normalises over every row of the module and cannot be cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from loraport.adapter import Delta, Shape, oriented_contribution
from loraport.errors import PlanError


def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def rebuild_tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] from a Tucker core t [r, r, kh, kw], a [r, out], b [r, in]."""
    return torch.einsum("pq...,po,qi->oi...", t, a, b)


def _fits(have: Shape, want: Shape) -> bool:
    """`want` is the delta's shape, possibly with the kernel flattened into the input axis ([out, in·kh·kw])."""
    if tuple(have) == tuple(want):
        return True
    return (len(want) == 2 and len(have) > 2 and have[0] == want[0] and math.prod(have[1:]) == want[1]) or (
        len(have) == 2 and len(want) == 4 and tuple(want[2:]) == (1, 1) and tuple(have) == tuple(want[:2]))


@dataclass
class _Factored(Delta):
    """Common part of LoHa and LoKr: a scaled dense product, optional transpose, optional DoRA."""

    scale: float = 1.0
    alpha: float | None = None
    transpose: bool = False  # the base stores ΔWᵀ (OpenCLIP text_projection)
    magnitude: torch.Tensor | None = None
    dora_axis: str = "out"
    dora_eps: float = 0.0

    factored: ClassVar[bool] = True

    @property
    def has_magnitude(self) -> bool:
        return self.magnitude is not None

    def _product_shape(self) -> Shape:
        raise NotImplementedError

    def product(self, device: torch.device) -> torch.Tensor:
        """s·ΔW in fp32, shaped as the product (kernel possibly flattened)."""
        raise NotImplementedError

    def product_rows(self, device: torch.device, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `product` (a kind may build only those)."""
        return self.product(device)[start:stop]

    def _cuttable(self) -> bool:
        """Whether the update to some output rows depends on those rows alone (no transpose, no input-axis DoRA)."""
        return not self.transpose and (self.magnitude is None or self.dora_axis == "out")

    def _magnitude_rows(self, start: int, stop: int) -> torch.Tensor | None:
        return None if self.magnitude is None else self.magnitude.reshape(-1)[start:stop]

    def output_rows(self, start: int, stop: int) -> Delta | None:
        """Rows [start, stop) of the update, built from the whole module's factors when applied (`RowPart`)."""
        if not self._cuttable():
            return None
        return RowPart(self.target, whole=replace(self, magnitude=None, rows=None), part=(start, stop),
                       magnitude=self._magnitude_rows(start, stop), dora_eps=self.dora_eps, rows=self.rows,
                       source_key=self.source_key)

    def implied_shape(self) -> Shape | None:
        s = self._product_shape()
        return (s[1], s[0], *s[2:]) if self.transpose else s

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        have = self._sliced(base_shape)
        want = self.implied_shape()
        if not _fits(have, want):
            raise PlanError(f"shape mismatch for {self.target}: adapter key {self.source_key or '?'} implies "
                            f"{list(want)}, base tensor is {list(have)}")
        return self

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        return oriented_contribution(W, self.product(W.device), self.transpose, self.magnitude, self.dora_axis,
                                     self.dora_eps)

    @property
    def depends_on_base(self) -> bool:
        return self.magnitude is not None

    def describe(self) -> dict:
        d = super().describe()
        d.update(scale=self.scale, alpha=self.alpha, dora=self.magnitude is not None)
        return d


@dataclass
class LohaDelta(_Factored):
    w1a: torch.Tensor = None  # type: ignore[assignment]
    w1b: torch.Tensor = None  # type: ignore[assignment]
    w2a: torch.Tensor = None  # type: ignore[assignment]
    w2b: torch.Tensor = None  # type: ignore[assignment]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind: ClassVar[str] = "loha"

    def _product_shape(self) -> Shape:
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], self.w1b.shape[1])

    def product(self, device: torch.device) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (_f32(t, device) for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is not None:
            d = rebuild_tucker(_f32(self.t1, device), w1a, w1b) * rebuild_tucker(_f32(self.t2, device), w2a, w2b)
        else:
            d = (w1a @ w1b) * (w2a @ w2b)
        return d.mul_(self.scale) if self.scale != 1.0 else d

    def output_rows(self, start: int, stop: int) -> Delta | None:
        """A LoHa: (w1a@w1b ⊙ w2a@w2b)[rows] = w1a[rows]@w1b ⊙ w2a[rows]@w2b (Tucker: the columns of w?a)."""
        if not self._cuttable():
            return None
        if self.t1 is not None:
            w1a, w2a = self.w1a[:, start:stop], self.w2a[:, start:stop]
        else:
            w1a, w2a = self.w1a[start:stop], self.w2a[start:stop]
        return replace(self, w1a=w1a.contiguous(), w2a=w2a.contiguous(),
                       magnitude=self._magnitude_rows(start, stop))

    @classmethod
    def from_row_parts(cls, parts: list[tuple[Delta, tuple[int, int]]], total: int) -> Delta | None:
        """LoHas on row ranges as one LoHa: each part's w1a (scale folded in) and w2a at its rows, in its own
        block of columns against the w?b stacked (rank Σr; rank r when the parts are rows of one LoHa: same
        w1b, w2b, scale). Exact: row o of (w1a@w1b) ⊙ (w2a@w2b) sees only its part's block. Output-axis DoRA
        magnitudes concatenate when the parts cover every row (a row without one would be rescaled)."""
        ds = [d for d, _ in parts]
        if not all(type(d) is cls and d.t1 is None and d._cuttable() and d.rows is None for d in ds):
            return None
        mags = [d.magnitude for d in ds]
        if any(m is not None for m in mags) and (None in mags or sum(b - a for _, (a, b) in parts) != total):
            return None
        d0 = ds[0]
        shared = all(d.scale == d0.scale and torch.equal(d.w1b, d0.w1b) and torch.equal(d.w2b, d0.w2b) for d in ds)
        blocks = [d0] if shared else ds
        r = sum(int(d.w1b.shape[0]) for d in blocks)
        w1a, w2a = torch.zeros(total, r), torch.zeros(total, r)
        c = 0
        for d, (a, b) in parts:
            k = int(d.w1b.shape[0])
            w1a[a:b, c:c + k] = d.w1a.float() * (1.0 if shared else d.scale)
            w2a[a:b, c:c + k] = d.w2a.float()
            c += 0 if shared else k
        mag = None
        if mags[0] is not None:
            mag = torch.zeros(total)
            for d, (a, b) in parts:
                mag[a:b] = d.magnitude.float().reshape(-1)
        w1b = torch.cat([d.w1b.float() for d in blocks])
        w2b = torch.cat([d.w2b.float() for d in blocks])
        scale = d0.scale if shared else 1.0
        return replace(d0, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, scale=scale, alpha=scale * r, magnitude=mag,
                       rows=None)

    def rank(self) -> int | None:
        return int(self.w1b.shape[0])

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.w1a, self.w1b, self.w2a, self.w2b)

    def num_params(self) -> int:
        ts = (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2, self.magnitude)
        return sum(t.numel() for t in ts if t is not None)


@dataclass
class LokrDelta(_Factored):
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind: ClassVar[str] = "lokr"

    def __post_init__(self):
        if (self.w1 is None) == (self.w1a is None or self.w1b is None):
            raise PlanError(f"{self.source_key or self.target}: LoKr needs lokr_w1 or both lokr_w1_a/lokr_w1_b")
        if (self.w2 is None) == (self.w2a is None or self.w2b is None):
            raise PlanError(f"{self.source_key or self.target}: LoKr needs lokr_w2 or both lokr_w2_a/lokr_w2_b")

    def _w1_shape(self) -> Shape:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])

    def _w2_shape(self) -> Shape:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        return (self.w2a.shape[0], self.w2b.shape[1])

    def _product_shape(self) -> Shape:
        a, b = self._w1_shape(), self._w2_shape()
        return (a[0] * b[0], a[1] * b[1], *b[2:])

    def product(self, device: torch.device) -> torch.Tensor:
        return self._kron(self._w1(device), self._w2(device), device)

    def _w1(self, device: torch.device) -> torch.Tensor:
        return _f32(self.w1, device) if self.w1 is not None else _f32(self.w1a, device) @ _f32(self.w1b, device)

    def _w2(self, device: torch.device) -> torch.Tensor:
        if self.w2 is not None:
            return _f32(self.w2, device)
        if self.t2 is not None:
            return rebuild_tucker(_f32(self.t2, device), _f32(self.w2a, device), _f32(self.w2b, device))
        return _f32(self.w2a, device) @ _f32(self.w2b, device)

    def _kron(self, w1: torch.Tensor, w2: torch.Tensor, device: torch.device) -> torch.Tensor:
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        d = torch.kron(w1.contiguous(), w2.contiguous())
        return d.mul_(self.scale) if self.scale != 1.0 else d

    def product_rows(self, device: torch.device, start: int, stop: int) -> torch.Tensor:
        """Row o of kron(w1, w2) is w1[o // k] ⊗ w2[o % k] (k = w2's rows): only w1's rows that reach [start, stop)."""
        k = self._w2_shape()[0]
        lo, hi = start // k, -(-stop // k)
        return self._kron(self._w1(device)[lo:hi], self._w2(device), device)[start - lo * k:stop - lo * k]

    def rank(self) -> int | None:
        b = self.w2b if self.w2b is not None else self.w1b
        return None if b is None else int(b.shape[0])

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b) if t is not None)

    def num_params(self) -> int:
        ts = (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2, self.magnitude)
        return sum(t.numel() for t in ts if t is not None)


@dataclass
class RowPart(Delta):
    """Rows `part` = [start, stop) of a LoHa/LoKr module's update (`whole`, without its DoRA magnitude), placed
    on `target` (at `rows` when the target is fused): the module's share of a tensor another layout cuts
    differently. The rows are built from the whole module's factors when applied, so no dense ΔW is kept; an
    output-axis DoRA magnitude comes cut to the part."""

    whole: _Factored = None  # type: ignore[assignment]
    part: tuple[int, int] = (0, 0)
    magnitude: torch.Tensor | None = None
    dora_eps: float = 0.0

    kind: ClassVar[str] = "rows"
    factored: ClassVar[bool] = True

    @property
    def has_magnitude(self) -> bool:
        return self.magnitude is not None

    @property
    def label(self) -> str:
        return f"{self.whole.kind} (rows {self.part[0]}:{self.part[1]} of one module)"

    @property
    def variant(self) -> str:
        return self.whole.kind + ("-dora" if self.magnitude is not None else "")

    @property
    def depends_on_base(self) -> bool:
        return self.magnitude is not None

    def implied_shape(self) -> Shape | None:
        s = self.whole.implied_shape()
        return (self.part[1] - self.part[0], *s[1:])

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        have, want = self._sliced(base_shape), self.implied_shape()
        if not _fits(have, want):
            raise PlanError(f"shape mismatch for {self.target}: adapter key {self.source_key or '?'} implies "
                            f"{list(want)}, base tensor is {list(have)}")
        return self

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        d = self.whole.product_rows(W.device, *self.part)
        return oriented_contribution(W, d, False, self.magnitude, "out", self.dora_eps)

    def output_rows(self, start: int, stop: int) -> Delta | None:
        a = self.part[0]
        return replace(self, part=(a + start, a + stop),
                       magnitude=None if self.magnitude is None else self.magnitude[start:stop])

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.whole.stored_tensors()

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        own = [] if self.magnitude is None else [("magnitude", self.magnitude)]
        return self.whole.named_tensors() + own

    def same_update(self, other: Delta) -> bool:
        return (isinstance(other, RowPart) and self.part == other.part and self.whole.same_update(other.whole)
                and (self.magnitude is None) == (other.magnitude is None)
                and (self.magnitude is None or torch.equal(self.magnitude, other.magnitude)))

    def rank(self) -> int | None:
        return self.whole.rank()

    def num_params(self) -> int:
        """The module's parameters in proportion to the rows (the parts of one module add up to it)."""
        rows = self.whole.implied_shape()[0]
        return self.whole.num_params() * (self.part[1] - self.part[0]) // max(rows, 1)

    def describe(self) -> dict:
        d = super().describe()
        d.update(of=self.whole.kind, part=list(self.part), scale=self.whole.scale, dora=self.magnitude is not None)
        return d


@dataclass
class Ia3Delta(Delta):
    """W' = W ⊙ (1 + v): v scales output channels (rows) or, with on_input, input channels (columns)."""

    vector: torch.Tensor = None  # type: ignore[assignment]
    on_input: bool = False
    stored_in_out: bool = False  # the base stores [in, out] (GPT-2 Conv1D): the axes swap; set by resolve

    kind: ClassVar[str] = "ia3"

    def _axis(self) -> int:
        return int(self.on_input != self.stored_in_out)

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        have = self._sliced(base_shape)
        r = replace(self, stored_in_out=hint == "conv1d")
        n = self.vector.numel()
        # a 1-D target (a bias) has only outputs: PEFT's IA³ scales the bias of a non-feedforward layer
        if len(have) <= r._axis() or have[r._axis()] != n or (len(have) < 2 and self.on_input):
            side = "input" if self.on_input else "output"
            raise PlanError(f"shape mismatch for {self.target}: IA³ vector {self.source_key or '?'} has {n} "
                            f"{side} channels, base tensor is {list(have)}")
        return r

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        view = [1] * W.dim()
        view[self._axis()] = -1
        return W * _f32(self.vector, W.device).reshape(view)

    @property
    def depends_on_base(self) -> bool:
        return True

    def num_params(self) -> int:
        return self.vector.numel()

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.vector,)

    def describe(self) -> dict:
        d = super().describe()
        d["axis"] = "in" if self.on_input else "out"
        return d
