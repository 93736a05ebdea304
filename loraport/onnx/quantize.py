"""Weight-only quantization inside an exported graph (spec: formats/onnx.md, "Quantized graphs").

* int8: per-output-channel symmetric, stored as the ONNX standard `DequantizeLinear` (int8 [in, out],
  float scale [out], axis=1) feeding the original `MatMul`; runs on every EP.
* int4: block-wise (block along the input dimension), stored as the ORT contrib op
  `com.microsoft.MatMulNBits` (bits=4): B uint8 [out, k_blocks, block/2] low nibble first, scales
  [out, k_blocks], zero points implicit (8, symmetric) or uint8 [out, ceil(k_blocks/2)] (asymmetric); codes
  bit-exact with onnxruntime's own quantizer, optionally with a per-block error-minimizing scale search
  (`Int4Options`).

The math is pure functions of tensors; `rewrite()` changes the (initializer-free) graph and tells the writer
which tensors each quantized weight becomes.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
from onnx import TensorProto, helper

from loraport.errors import BadInputError

MODES = ("int8", "int4")
MS_DOMAIN = "com.microsoft"


# ---------------------------------------------------------------------------------------------- math
def quantize_int8_per_channel(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] fp32 -> (q int8 [in, out], scale fp32 [out]) with W ≈ qᵀ·scale (symmetric, ±127)."""
    absmax = W.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(W / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.t().contiguous(), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.to(torch.float32) * scale[None, :]).t()


@dataclass(frozen=True)
class Int4Options:
    """How int4 weights are made (MatMulNBits bits=4; block along the input dimension).

    symmetric: zero point 8, s = signed absmax / −8 per block (onnxruntime's MatMul4BitsQuantizer default);
    asymmetric: a zero point per block, s = (max(hi, 0) − min(lo, 0)) / 15, zp = roundf(−min / s).
    Codes q = clamp(roundf(w / s + zp), 0, 15): bit-exact with onnxruntime's `quantize_matmul_4bits`.
    search: per block, also try shrunken ranges (and, symmetric, the +7 end of the grid) and keep the scale with
    the smallest squared error; never worse than the plain scale (it is one of the candidates).
    accuracy_level: MatMulNBits' attribute (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)."""

    block: int = 32
    symmetric: bool = True
    search: bool = False
    accuracy_level: int | None = None

    def check(self) -> Int4Options:
        if not isinstance(self.block, int) or self.block < 16 or self.block & (self.block - 1):
            raise BadInputError(f"int4 block size must be a power of two >= 16, got {self.block}")
        if self.accuracy_level is not None and self.accuracy_level not in range(5):
            raise BadInputError(f"int4 accuracy_level must be 0-4 (MatMulNBits), got {self.accuracy_level}")
        return self


SEARCH_SHRINK = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (what onnxruntime's quantizer uses, not torch.round's half-to-even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _codes(blocks: torch.Tensor, s: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    inv = torch.where(s == 0, torch.zeros_like(s), 1 / s)
    return _roundf(blocks * inv[..., None] + zp[..., None]).clamp_(0, 15)


def _candidate(blocks: torch.Tensor, symmetric: bool, f: float, end: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per block for range shrink `f` (symmetric: `end` −8 or 7 is where the signed absmax
    lands)."""
    if symmetric:
        lo, hi = blocks.amin(2), blocks.amax(2)
        m = torch.where(hi.abs() > lo.abs(), hi, lo)  # a tie goes to the negative end, as in onnxruntime
        return m * f / end, torch.full_like(m, 8.0)
    # asymmetric: `end` picks which side of the range shrinks (0 both, 1 the low, 2 the high end)
    lo = blocks.amin(2).clamp(max=0) * (f if end != 2 else 1.0)
    hi = blocks.amax(2).clamp(min=0) * (f if end != 1 else 1.0)
    s = (hi - lo) / 15
    zp = _roundf(torch.where(s == 0, torch.zeros_like(s), -lo / torch.where(s == 0, torch.ones_like(s), s)))
    return s, zp.clamp_(0, 15)


def quantize_int4(W: torch.Tensor, opts: Int4Options = Int4Options()):
    """W [N=out, K=in] fp32 -> (packed uint8 [N, k_blocks, block/2], scales fp32 [N, k_blocks], zero points
    uint8 [N, ceil(k_blocks/2)] or None when symmetric). K is zero-padded to whole blocks; two codes a byte,
    the first in the low nibble (MatMulNBits' layout; zero points packed the same way)."""
    N, K = W.shape
    block = opts.block
    kb = -(-K // block)
    W = W.to(torch.float32)
    if kb * block != K:
        W = torch.nn.functional.pad(W, (0, kb * block - K))
    blocks = W.reshape(N, kb, block)
    ends = ((-8.0, 7.0) if opts.symmetric else (0, 1, 2)) if opts.search else ((-8.0,) if opts.symmetric else (0,))
    cands = [(f, e) for f in (SEARCH_SHRINK if opts.search else (1.0,)) for e in ends]
    best = None
    for f, e in cands:
        s, zp = _candidate(blocks, opts.symmetric, f, e)
        q = _codes(blocks, s, zp)
        err = ((q - zp[..., None]) * s[..., None] - blocks).square_().sum(2)
        if best is None:
            best = [err, s, zp, q]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1], best[2] = torch.where(better, s, best[1]), torch.where(better, zp, best[2])
        best[3] = torch.where(better[..., None], q, best[3])
    _, s, zp, q = best
    q = q.to(torch.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
    if opts.symmetric:
        return packed, s, None
    z = zp.to(torch.uint8)
    if kb % 2:  # the unused high nibble holds 8, as onnxruntime writes it
        z = torch.nn.functional.pad(z, (0, 1), value=8)
    return packed, s, (z[:, 0::2] | (z[:, 1::2] << 4)).contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                    K: int) -> torch.Tensor:
    N, kb = scales.shape
    q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(N, kb, -1).to(torch.float32)
    if zero_points is None:
        z = torch.full((N, kb), 8.0)
    else:
        z = torch.stack((zero_points & 0x0F, zero_points >> 4), dim=-1).reshape(N, -1)[:, :kb].to(torch.float32)
    return ((q - z[..., None]) * scales[..., None]).reshape(N, -1)[:, :K]


def quantize_int4_blocks(W: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 (the default): (packed [N, k_blocks, block/2], scales [N, k_blocks]); see quantize_int4."""
    packed, scales, _ = quantize_int4(W, Int4Options(block=block))
    return packed, scales


def dequantize_int4_blocks(packed: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    return dequantize_int4(packed, scales, None, K)


# ---------------------------------------------------------------------------------------------- graph
@dataclass
class QuantEntry:
    """A weight `name` (torch layout [out, in]) replaced by quantized tensors."""

    name: str
    mode: str
    out_features: int
    in_features: int
    names: tuple[str, ...]  # the initializers it becomes, in writing order
    block: int = 32
    int4: Int4Options | None = None


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    c: dict[str, list] = {}
    for n in graph.node:
        for i, x in enumerate(n.input):
            c.setdefault(x, []).append((n, i))
    return c


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def rewrite(proto: onnx.ModelProto, weights: dict[str, tuple[int, ...]], mode: str, elem_type: int,
            block: int = 32, exclude: set[str] | None = None,
            int4: Int4Options | None = None) -> dict[str, QuantEntry]:
    """Quantize every 2-D weight in `weights` (name -> torch shape) that reaches a MatMul as its right-hand
    side through `Transpose(perm=[1,0])` (the torch.onnx `optimize=False` pattern for nn.Linear) and has no
    other consumer. Returns {weight name: QuantEntry}; weights not matched stay float. `int4` (default:
    symmetric, `block`) says how int4 weights are made."""
    if mode not in MODES:
        raise BadInputError(f"unknown --quantize {mode!r} for ONNX (choose {', '.join(MODES)})")
    g = proto.graph
    cons = _consumers(g)
    entries: dict[str, QuantEntry] = {}
    remove: list[onnx.NodeProto] = []
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (anchor, replacement)
    for name, shape in weights.items():
        if len(shape) != 2 or (exclude and name in exclude):
            continue
        uses = cons.get(name, [])
        if len(uses) != 1 or uses[0][0].op_type != "Transpose" or _perm(uses[0][0]) not in (None, [1, 0]):
            continue
        tr = uses[0][0]
        mm_uses = cons.get(tr.output[0], [])
        if not mm_uses or any(n.op_type != "MatMul" or i != 1 for n, i in mm_uses):
            continue
        n_out, k_in = shape
        if mode == "int8":
            q, s = f"{name}.int8", f"{name}.scale"
            dq = helper.make_node("DequantizeLinear", [q, s], [tr.output[0]], name=f"{name}.DequantizeLinear",
                                  axis=1)
            new_nodes.append((tr, dq))
            remove.append(tr)
            entries[name] = QuantEntry(name, mode, n_out, k_in, (q, s))
        else:
            opts = (int4 or Int4Options(block=block)).check()
            if len(mm_uses) != 1:
                continue
            mm = mm_uses[0][0]
            names = (f"{name}.int4", f"{name}.scales") + (() if opts.symmetric else (f"{name}.zero_points",))
            extra = {} if opts.accuracy_level is None else {"accuracy_level": opts.accuracy_level}
            nb = helper.make_node("MatMulNBits", [mm.input[0], *names], list(mm.output), name=f"{name}.MatMulNBits",
                                  domain=MS_DOMAIN, K=k_in, N=n_out, bits=4, block_size=opts.block, **extra)
            new_nodes.append((mm, nb))
            remove += [tr, mm]
            entries[name] = QuantEntry(name, mode, n_out, k_in, names, opts.block, opts)
    if not entries:
        return entries
    repl = {id(a): b for a, b in new_nodes}
    drop = {id(n) for n in remove}
    nodes = []
    for n in g.node:
        if id(n) in repl:
            nodes.append(repl[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    if mode == "int4" and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    stale = {n for e in entries.values() for n in (e.name,)}
    keep_vi = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    return entries


def quantized_tensors(entry: QuantEntry, W: torch.Tensor, float_dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """The initializers for one quantized weight from its merged fp32 value W [out, in]."""
    if entry.mode == "int8":
        q, s = quantize_int8_per_channel(W)
        return [(entry.names[0], q), (entry.names[1], s.to(float_dtype))]
    packed, scales, zp = quantize_int4(W, entry.int4 or Int4Options(block=entry.block))
    out = [(entry.names[0], packed), (entry.names[1], scales.to(float_dtype))]
    return out if zp is None else out + [(entry.names[2], zp)]


def entry_layout(entry: QuantEntry, float_dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each initializer `quantized_tensors` makes for `entry`, in writing order."""
    n, k = entry.out_features, entry.in_features
    if entry.mode == "int8":
        return [(entry.names[0], torch.int8, (k, n)), (entry.names[1], float_dtype, (n,))]
    kb = -(-k // entry.block)
    out = [(entry.names[0], torch.uint8, (n, kb, entry.block // 2)), (entry.names[1], float_dtype, (n, kb))]
    if entry.int4 is not None and not entry.int4.symmetric:  # zero points, two a byte (MatMulNBits' 4th input)
        out.append((entry.names[2], torch.uint8, (n, -(-kb // 2))))
    return out


class GraphQuantizer:
    """The stream's quantizer role for a quantized export: each weight `rewrite` chose becomes its initializers
    (the merge engine's quantizers have the same two methods)."""

    def __init__(self, entries: dict[str, QuantEntry], float_dtype: torch.dtype):
        self.q, self.float_dtype = entries, float_dtype

    def entries(self, name: str, shape, layer_hint=None):
        e = self.q.get(name)
        return None if e is None else entry_layout(e, self.float_dtype)

    def unchanged(self, name: str) -> None:
        """No weight is kept as stored: every quantized one is made from the (merged) fp32 value."""
        return None

    def quantize(self, name: str, w32: torch.Tensor, base32=None) -> dict[str, torch.Tensor]:
        e = self.q[name]
        W = w32.reshape(e.out_features, e.in_features)
        return dict(quantized_tensors(e, W, self.float_dtype))


ONNX_FLOAT = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
