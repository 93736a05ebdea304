"""Weight-only quantization inside an exported graph (spec: formats/onnx.md, "Quantized graphs").

* int8: per-output-channel symmetric, stored as the ONNX standard `DequantizeLinear` (int8 [in, out],
  float scale [out], axis=1) feeding the original `MatMul`; runs on every EP.
* int4: block-wise symmetric (block along the input dimension), stored as the ORT contrib op
  `com.microsoft.MatMulNBits` (bits=4): B uint8 [out, k_blocks, block/2] low nibble first, scales
  [out, k_blocks], implicit zero point 8.

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


def quantize_int4_blocks(W: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N=out, K=in] fp32 -> (packed uint8 [N, k_blocks, block/2], scales fp32 [N, k_blocks]).

    Symmetric: q = clamp(round(w / s), -8, 7) + 8 with s = absmax / 7 per block; K is zero-padded to a
    multiple of `block`; two 4-bit values per byte, the first in the low nibble (MatMulNBits' layout)."""
    N, K = W.shape
    kb = -(-K // block)
    if kb * block != K:
        W = torch.nn.functional.pad(W, (0, kb * block - K))
    blocks = W.reshape(N, kb, block)
    absmax = blocks.abs().amax(dim=2)
    scales = torch.where(absmax > 0, absmax / 7.0, torch.ones_like(absmax))
    q = (torch.round(blocks / scales[..., None]).clamp_(-8, 7) + 8).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed.contiguous(), scales


def dequantize_int4_blocks(packed: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    q = torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], packed.shape[1], -1) - 8
    W = (q.to(torch.float32) * scales[..., None]).reshape(packed.shape[0], -1)
    return W[:, :K]


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
            block: int = 32, exclude: set[str] | None = None) -> dict[str, QuantEntry]:
    """Quantize every 2-D weight in `weights` (name -> torch shape) that reaches a MatMul as its right-hand
    side through `Transpose(perm=[1,0])` (the torch.onnx `optimize=False` pattern for nn.Linear) and has no
    other consumer. Returns {weight name: QuantEntry}; weights not matched stay float."""
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
            if block < 16 or block & (block - 1):
                raise BadInputError(f"int4 block size must be a power of two >= 16, got {block}")
            if len(mm_uses) != 1:
                continue
            mm = mm_uses[0][0]
            q, s = f"{name}.int4", f"{name}.scales"
            nb = helper.make_node("MatMulNBits", [mm.input[0], q, s], list(mm.output), name=f"{name}.MatMulNBits",
                                  domain=MS_DOMAIN, K=k_in, N=n_out, bits=4, block_size=block)
            new_nodes.append((mm, nb))
            remove += [tr, mm]
            entries[name] = QuantEntry(name, mode, n_out, k_in, (q, s), block)
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
    packed, scales = quantize_int4_blocks(W, entry.block)
    return [(entry.names[0], packed), (entry.names[1], scales.to(float_dtype))]


def entry_layout(entry: QuantEntry, float_dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each initializer `quantized_tensors` makes for `entry`, in writing order."""
    n, k = entry.out_features, entry.in_features
    if entry.mode == "int8":
        return [(entry.names[0], torch.int8, (k, n)), (entry.names[1], float_dtype, (n,))]
    kb = -(-k // entry.block)
    return [(entry.names[0], torch.uint8, (n, kb, entry.block // 2)), (entry.names[1], float_dtype, (n, kb))]


class GraphQuantizer:
    """The stream's quantizer role for a quantized export: each weight `rewrite` chose becomes its initializers
    (the merge engine's quantizers have the same two methods)."""

    def __init__(self, entries: dict[str, QuantEntry], float_dtype: torch.dtype):
        self.q, self.float_dtype = entries, float_dtype

    def entries(self, name: str, shape, layer_hint=None):
        e = self.q.get(name)
        return None if e is None else entry_layout(e, self.float_dtype)

    def quantize(self, name: str, w32: torch.Tensor, base32=None) -> dict[str, torch.Tensor]:
        e = self.q[name]
        W = w32.reshape(e.out_features, e.in_features)
        return dict(quantized_tensors(e, W, self.float_dtype))


ONNX_FLOAT = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
