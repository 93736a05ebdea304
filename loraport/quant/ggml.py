"""ggml tensor types as pure torch functions: raw GGUF bytes ⇄ fp32, bit-exact with the `gguf` package's
numpy reference (`gguf.quants`, itself bit-exact with ggml-quants.c's reference quantizers) for F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1. Torch runs the same float32 operations in the same order (1/d, x·id,
trunc/round-half-away) on all cores, so the codes are equal and the work is faster than numpy's one thread.

Block layouts (32 weights a block, little-endian, d and m fp16):
  Q8_0 [d, 32 × int8]                 x = d·q
  Q4_0 [d, 16 B nibbles]              x = d·(q − 8),  d = signed absmax / −8
  Q4_1 [d, m, 16 B nibbles]           x = d·q + m,    d = (max − min) / 15
  Q5_0 [d, 4 B high bits, 16 B]       x = d·(q − 16), d = signed absmax / −16
  Q5_1 [d, m, 4 B high bits, 16 B]    x = d·q + m,    d = (max − min) / 31
Nibbles: byte j holds weight j (low) and weight j + 16 (high); high bits: bit j of the uint32 is weight j's.
The k-quants Q2_K…Q6_K (256-weight super-blocks) are written by `loraport.quant.ggml_kquants`, code for code
libggml's `ggml_quantize_chunk` without an importance matrix, and read by `loraport.quant.ggml_kdequant`, value
for value gguf.quants' dequantizer. Types
loraport reads but cannot write (`READ_ONLY`: the IQ* and TQ* grids, MXFP4) are written, once updated, in the
type `FALLBACK` names (`writable()`): the nearest with at least as many bits per weight. `UNSUPPORTED` names
what cannot be read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loraport.quant import ggml_kdequant, ggml_kquants
from loraport.threads import cores, torch_threads


@dataclass(frozen=True)
class GgmlType:
    name: str
    id: int  # ggml_type
    block: int  # weights per block
    nbytes: int  # bytes per block


TYPES: dict[int, GgmlType] = {t.id: t for t in (
    GgmlType("F32", 0, 1, 4), GgmlType("F16", 1, 1, 2), GgmlType("BF16", 30, 1, 2),
    GgmlType("Q4_0", 2, 32, 18), GgmlType("Q4_1", 3, 32, 20), GgmlType("Q5_0", 6, 32, 22),
    GgmlType("Q5_1", 7, 32, 24), GgmlType("Q8_0", 8, 32, 34),
)}
TYPES.update({t.id: t for t in (  # k-quants: 256-weight super-blocks (ggml_kquants.py)
    GgmlType("Q2_K", 10, 256, 84), GgmlType("Q3_K", 11, 256, 110), GgmlType("Q4_K", 12, 256, 144),
    GgmlType("Q5_K", 13, 256, 176), GgmlType("Q6_K", 14, 256, 210),
)})
# read (dequantized by gguf.quants, the reference) but not written: libggml quantizes these with lattice searches
# (and an importance matrix for the smallest) loraport does not reproduce. An updated tensor is written in the
# FALLBACK type, the nearest with at least as many bits per weight and a block that divides the row; a warning
# names both. bpw: IQ1_S 1.56, IQ1_M 1.75, IQ2_XXS 2.06, IQ2_XS 2.31, IQ2_S 2.56, TQ1_0 1.69, TQ2_0 2.06 -> Q2_K
# 2.63; IQ3_XXS 3.06, IQ3_S 3.44 -> Q3_K 3.44; IQ4_XS 4.25 -> Q4_K 4.5; IQ4_NL 4.5, MXFP4 4.25 (blocks of 32)
# -> Q4_1 5.0.
READ_ONLY: dict[int, GgmlType] = {t.id: t for t in (
    GgmlType("IQ2_XXS", 16, 256, 66), GgmlType("IQ2_XS", 17, 256, 74), GgmlType("IQ3_XXS", 18, 256, 98),
    GgmlType("IQ1_S", 19, 256, 50), GgmlType("IQ4_NL", 20, 32, 18), GgmlType("IQ3_S", 21, 256, 110),
    GgmlType("IQ2_S", 22, 256, 82), GgmlType("IQ4_XS", 23, 256, 136), GgmlType("IQ1_M", 29, 256, 56),
    GgmlType("TQ1_0", 34, 256, 54), GgmlType("TQ2_0", 35, 256, 66), GgmlType("MXFP4", 39, 32, 17),
)}
FALLBACK = {"IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ2_S": "Q2_K",
            "TQ1_0": "Q2_K", "TQ2_0": "Q2_K", "IQ3_XXS": "Q3_K", "IQ3_S": "Q3_K", "IQ4_XS": "Q4_K",
            "IQ4_NL": "Q4_1", "MXFP4": "Q4_1"}
BY_NAME = {t.name: t for t in (*TYPES.values(), *READ_ONLY.values())}
# ggml types a GGUF base may hold that loraport cannot read (named in the refusal)
UNSUPPORTED = {15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}


# Blocks per step: ~1 MB of fp32 temporaries stay in cache and in the allocator's reused memory. Whole-tensor
# temporaries were 5-10x slower than numpy on 2 cores (every op faulted in fresh pages).
CHUNK = 8192


def row_bytes(t: GgmlType, n: int) -> int:
    return n // t.block * t.nbytes


# --- helpers -----------------------------------------------------------------------------------------------
def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n, 1] fp32 -> [n, 2] uint8 (fp16, little-endian)."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] fp32."""
    return b.contiguous().view(torch.float16).float().reshape(-1, 1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero) written as gguf's np_roundf: floor(|x|) + floor(2·frac), signed."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] uint8 codes (low 4 bits used) -> [n, 16]: weight j low, weight j + 16 high."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 0x0F, b >> 4], dim=1)


_BITS = 1 << torch.arange(8, dtype=torch.int32)


def _pack_high(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 codes -> 4 bytes, bit j of the little-endian uint32 = weight j."""
    bits = ((q >> 4) & 1).to(torch.int32).reshape(-1, 4, 8)
    return (bits * _BITS).sum(-1).to(torch.uint8)


def _unpack_high(b: torch.Tensor) -> torch.Tensor:
    return ((b.to(torch.int32).unsqueeze(-1) & _BITS) != 0).to(torch.uint8).reshape(-1, 32)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block, with its sign (first one on ties, as numpy's argmax)."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    m = torch.where(hi > -lo, hi, lo)
    tie = (hi == -lo) & (hi != 0)  # +a and -a both present: the first one wins (rare, so looked up only then)
    if bool(tie.any()):
        rows = tie.squeeze(1).nonzero().squeeze(1)
        m[rows] = torch.gather(x[rows], 1, x[rows].abs().argmax(dim=1, keepdim=True))
    return m


# --- quantize: [n, 32] fp32 blocks -> [n, nbytes] uint8 ------------------------------------------------------
_JUST_BELOW_HALF = 0.49999997  # 0.5 − 2⁻²⁵, the float32 just below 0.5


def _q8_0(x, out):
    """Q8_0 blocks written into `out` ([n, 34] uint8) in 6 passes over the weights, no [n, 34] temporary.
    roundf(x/d) as trunc(y + 0.49999997·sign(y)) (the float→int8 conversion truncates): exact half-away-from-zero
    for |y| ≤ 127.5 — a tie y = k + 0.5 sums to within 2⁻²⁵ of k + 1 and rounds up to it, anything below stays
    below, and unlike y ± 0.5 the largest float below 0.5 stays 0; the product c·sign(y) is exact (±c, or 0
    where y = ±0: code 0 either way), so add(alpha=c) rounds once whether or not it fuses the multiply."""
    y = torch.abs(x)
    # the largest |x| as the largest bit pattern: for floats without a sign bit the orders agree, and torch's
    # integer max is twice as fast as its float max over rows of 32
    d = torch.amax(y.view(torch.int32), 1, keepdim=True).view(torch.float32).div_(127)
    torch.mul(x, torch.reciprocal(d).masked_fill_(d == 0, 0), out=y)
    s = torch.sign(y)
    torch.add(y, s, alpha=_JUST_BELOW_HALF, out=s)
    out[:, 2:].view(torch.int8).copy_(s)  # converts (truncating) straight into the strided code bytes
    out.view(torch.float16)[:, :1].copy_(d)  # d's 2 bytes: a row of 34 bytes is 17 fp16s


def _q4_0(x):
    d = _signed_absmax(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], 1)


def _q5_0(x):
    d = _signed_absmax(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_high(q), _pack_nibbles(q)], 1)


def _q4_1(x):
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], 1)


def _q5_1(x):
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (hi - lo) / 31
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_high(q), _pack_nibbles(q)], 1)


# --- dequantize: [n, nbytes] uint8 -> [n, 32] fp32 ----------------------------------------------------------
def _dq8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _dq4_0(b):
    return _f16(b[:, :2]) * (_unpack_nibbles(b[:, 2:]).float() - 8)


def _dq4_1(b):
    return _f16(b[:, :2]) * _unpack_nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _dq5_0(b):
    q = _unpack_nibbles(b[:, 6:]) | (_unpack_high(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _dq5_1(b):
    q = _unpack_nibbles(b[:, 8:]) | (_unpack_high(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


_QUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, **ggml_kquants.QUANTIZERS}
_DEQUANT = {"Q8_0": _dq8_0, "Q4_0": _dq4_0, "Q4_1": _dq4_1, "Q5_0": _dq5_0, "Q5_1": _dq5_1,
            **ggml_kdequant.DEQUANTIZERS}
# quantizers that write into their slice of the output (fn(blocks, out)) instead of returning it
_QUANT_INTO = {"Q8_0": _q8_0}
# super-blocks per step for the k-quants: their searches run ~20 passes over [lanes, sub-blocks] buffers, so a
# step of 1024 (1 MiB of fp32) amortizes the per-op cost while the buffers stay in cache
K_CHUNK = 1024


def _chunked(fn, blocks: torch.Tensor, out: torch.Tensor, chunk: int = CHUNK, workers: int | None = None,
             into: bool = False) -> None:
    """out[i] = fn(blocks[i]) (`into`: fn(blocks[i], out[i])) a chunk at a time, chunks spread over the cores (or
    `workers` threads), one torch thread each (an OpenMP team per op stalled on a busy machine: 5x slower than one
    thread; loraport/threads.py)."""
    starts = range(0, blocks.shape[0], chunk)
    workers = workers or cores()

    def run(i: int) -> None:
        if into:
            fn(blocks[i:i + chunk], out[i:i + chunk])
        else:
            out[i:i + chunk] = fn(blocks[i:i + chunk])

    def one(i: int) -> None:
        with torch_threads(1):
            run(i)

    if len(starts) == 1 or workers == 1:
        with torch_threads(1):  # once, not per chunk (switching per chunk: ~3% of Q8_0's time)
            for i in starts:
                run(i)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(starts))) as ex:
        list(ex.map(one, starts))


def quantize(x: torch.Tensor, t: GgmlType, workers: int | None = None) -> torch.Tensor:
    """fp32 tensor (rows a multiple of the block) -> its GGUF bytes, flat uint8; on `workers` threads (default:
    every core)."""
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if t.name == "F32":
        return x.reshape(-1).view(torch.uint8)
    if t.name == "F16":
        return x.to(torch.float16).reshape(-1).view(torch.uint8)
    if t.name == "BF16":
        return x.to(torch.bfloat16).reshape(-1).view(torch.uint8)
    if x.shape[-1] % t.block:
        raise ValueError(f"rows of {x.shape[-1]} are not a multiple of {t.name}'s block of {t.block}")
    blocks = x.reshape(-1, t.block)
    out = torch.empty(blocks.shape[0], t.nbytes, dtype=torch.uint8)
    if t.name in _QUANT_INTO:
        _chunked(_QUANT_INTO[t.name], blocks, out, CHUNK, workers, into=True)
    else:
        _chunked(_QUANT[t.name], blocks, out, K_CHUNK if t.block == ggml_kquants.QK else CHUNK, workers)
    return out.reshape(-1)


def writable(t: GgmlType) -> GgmlType:
    """The type an updated tensor stored as `t` is written in: itself, or its FALLBACK (READ_ONLY types)."""
    return BY_NAME[FALLBACK[t.name]] if t.id in READ_ONLY else t


def dequantize(raw: torch.Tensor, t: GgmlType, shape: tuple[int, ...]) -> torch.Tensor:
    """GGUF bytes (flat uint8) of a tensor of `shape` (torch order) -> fp32."""
    raw = raw.reshape(-1)
    if t.name not in _DEQUANT and t.block > 1:  # READ_ONLY types: gguf.quants' numpy dequantizer
        import gguf
        import numpy as np

        blocks = raw.numpy().reshape(-1, t.nbytes)
        out = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(t.id)).astype(np.float32, copy=False)
        return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape)
    if t.name == "F32":
        return raw.view(torch.float32).reshape(shape).clone()
    if t.name == "F16":
        return raw.view(torch.float16).float().reshape(shape)
    if t.name == "BF16":
        return raw.view(torch.bfloat16).float().reshape(shape)
    blocks = raw.reshape(-1, t.nbytes)
    out = torch.empty(blocks.shape[0], t.block, dtype=torch.float32)
    _chunked(_DEQUANT[t.name], blocks, out, K_CHUNK if t.block == ggml_kquants.QK else CHUNK)
    return out.reshape(shape)
