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
The k-quants Q2_K…Q6_K are read (through gguf.quants' dequantizer) but not written: gguf-py has no quantizer
for them and libggml's is not reachable here, so `writable()` names the legacy type an updated tensor is
written in instead (`FALLBACK`: at least as many bits per weight); `UNSUPPORTED` names what cannot be read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

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
# k-quants: read (dequantized by gguf.quants, the reference), but loraport has no quantizer for them: an updated
# tensor is written in the nearest type here with at least as many bits per weight (a warning says so)
READ_ONLY: dict[int, GgmlType] = {t.id: t for t in (
    GgmlType("Q2_K", 10, 256, 84), GgmlType("Q3_K", 11, 256, 110), GgmlType("Q4_K", 12, 256, 144),
    GgmlType("Q5_K", 13, 256, 176), GgmlType("Q6_K", 14, 256, 210),
)}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q8_0", "Q6_K": "Q8_0"}  # bpw 2.6/3.4/4.5/5.5/6.6
BY_NAME = {t.name: t for t in (*TYPES.values(), *READ_ONLY.values())}
# ggml types a GGUF base may hold that loraport cannot read (named in the refusal)
UNSUPPORTED = {15: "Q8_K", 16: "IQ2_XXS",
               17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
               24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
               39: "MXFP4"}


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
def _q8_0(x):
    d = x.abs().amax(1, keepdim=True) / 127
    q = _roundf(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], 1)


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


_BLOCK_FNS = {"Q8_0": (_q8_0, _dq8_0), "Q4_0": (_q4_0, _dq4_0), "Q4_1": (_q4_1, _dq4_1),
              "Q5_0": (_q5_0, _dq5_0), "Q5_1": (_q5_1, _dq5_1)}


def _chunked(fn, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = fn(blocks[i]) a chunk at a time, chunks spread over the cores, one torch thread each (an
    OpenMP team per op stalled on a busy machine: 5x slower than one thread; see loraport/threads.py)."""
    starts = range(0, blocks.shape[0], CHUNK)

    def one(i: int) -> None:
        with torch_threads(1):
            out[i:i + CHUNK] = fn(blocks[i:i + CHUNK])

    if len(starts) == 1 or cores() == 1:
        one(0) if len(starts) == 1 else [one(i) for i in starts]
        return
    with ThreadPoolExecutor(max_workers=min(cores(), len(starts))) as ex:
        list(ex.map(one, starts))


def quantize(x: torch.Tensor, t: GgmlType) -> torch.Tensor:
    """fp32 tensor (rows a multiple of the block) -> its GGUF bytes, flat uint8."""
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
    _chunked(_BLOCK_FNS[t.name][0], blocks, out)
    return out.reshape(-1)


def writable(t: GgmlType) -> GgmlType:
    """The type an updated tensor stored as `t` is written in: itself, or its FALLBACK."""
    return BY_NAME[FALLBACK[t.name]] if t.id in READ_ONLY else t


def dequantize(raw: torch.Tensor, t: GgmlType, shape: tuple[int, ...]) -> torch.Tensor:
    """GGUF bytes (flat uint8) of a tensor of `shape` (torch order) -> fp32."""
    raw = raw.reshape(-1)
    if t.id in READ_ONLY:  # gguf.quants' numpy dequantizer is the reference (and the only one here)
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
    _chunked(_BLOCK_FNS[t.name][1], blocks, out)
    return out.reshape(shape)
