"""Block-wise 4-bit quantization (NF4 / FP4) and the 8-bit double quantization of its statistics, as pure
functions of tensors. Bit-exact with bitsandbytes' CPU ops (0.50): same scaling arithmetic, same nearest-level
rule, same tie-breaking, same packing.

4-bit: the flattened tensor (row-major) is cut into blocks of `blocksize`; absmax[b] = max|x| over block b
(fp32); full blocks are scaled by a multiply with the fp32 reciprocal of their absmax, a partial last block by a
true division; each scaled value gets the code of its nearest level (tie → lower level); two codes per byte,
element 2i in the high nibble; an odd count is padded with a zero nibble. Stored as uint8 [(n+1)//2, 1].

Double quantization: offset = mean(absmax); (absmax - offset) is quantized in blocks of 256 with the dynamic
map through the same 65 536-bin table the native CPU kernel uses (so not always the nearest level: a value
within ~1.5e-5 of a midpoint may take the neighbour; the reconstruction error is the same); dequantized as
map[q] * nested_absmax[i // 256] + offset.

Speed: the nearest-level search is a 65 536-entry table indexed by the top 16 bits of the scaled fp32 value;
the few table cells that straddle a midpoint are resolved with an exact search. Work is done in chunks that
stay in cache. On CUDA the exact search is used directly.
"""

from __future__ import annotations

import functools
import sys

import torch

from loraport.quant.tables import code_table, dynamic_map, sorted_levels

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_AMBIGUOUS = 255
_LITTLE = sys.byteorder == "little"
_CHUNK = 1 << 18  # elements per CPU chunk (1 MiB of fp32): keeps the temporaries in L2/L3


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


# ------------------------------------------------------------------------------------------- 4-bit codes
@functools.cache
def _code_lut(quant_type: str) -> torch.Tensor:
    """uint8 [65536]: the code of every fp32 value with those top 16 bits, or 255 when the 2^16 values with
    those top bits do not all share one code (a midpoint inside, NaN)."""
    keys = torch.arange(65536, dtype=torch.int64) << 16
    keys = torch.where(keys >= 2**31, keys - 2**32, keys)
    lo = keys.to(torch.int32).view(torch.float32)
    hi = (keys | 0xFFFF).to(torch.int32).view(torch.float32)
    c_lo, c_hi = _codes_exact(lo, quant_type), _codes_exact(hi, quant_type)
    lut = torch.where(c_lo == c_hi, c_lo, torch.full_like(c_lo, _AMBIGUOUS))
    lut[torch.isnan(lo) | torch.isnan(hi)] = _AMBIGUOUS
    return lut


def _codes_exact(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    mids, order = sorted_levels(quant_type)
    pos = torch.bucketize(scaled, mids.to(scaled.device))
    return order.to(scaled.device)[pos]


class _Work:
    """Per-call scratch buffers for the CPU chunk loop: large temporaries are reused, not re-allocated (each
    fresh allocation of this size is a page-faulting mmap)."""

    def __init__(self, chunk: int, blocksize: int):
        self.x = torch.empty(chunk, dtype=torch.float32)
        self.abs = torch.empty(chunk, dtype=torch.float32)
        self.key = torch.empty(chunk, dtype=torch.int32)
        self.amb = torch.empty(chunk, dtype=torch.bool)


def _codes(scaled: torch.Tensor, quant_type: str, out: torch.Tensor | None = None,
           work: _Work | None = None) -> torch.Tensor:
    """uint8 codes of fp32 values already scaled into [-1, 1] (1-D), written to `out` when given."""
    if scaled.device.type != "cpu":
        c = _codes_exact(scaled, quant_type)
        return c if out is None else out.copy_(c)
    m = scaled.numel()
    key = work.key[:m] if work is not None else torch.empty(m, dtype=torch.int32)
    if _LITTLE:
        key.copy_(scaled.view(torch.uint16)[1::2])  # the high half of each little-endian fp32
    else:
        torch.bitwise_and(scaled.view(torch.int32) >> 16, 0xFFFF, out=key)
    c = torch.empty(m, dtype=torch.uint8) if out is None else out
    torch.index_select(_code_lut(quant_type), 0, key, out=c)
    if int(c.max()) == _AMBIGUOUS:  # a cheap uint8 reduction; then locate the few cells to resolve exactly
        amb = work.amb[:m] if work is not None else torch.empty(m, dtype=torch.bool)
        torch.eq(c, _AMBIGUOUS, out=amb)
        idx = amb.nonzero().squeeze(1)
        c[idx] = _codes_exact(scaled[idx], quant_type)
    return c


def quantize_4bit(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)]) on W's device."""
    check_blocksize(blocksize)
    flat = W.reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    full = (n // blocksize) * blocksize
    codes = torch.empty(n + (n & 1), dtype=torch.uint8, device=W.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=W.device)
    cpu = W.device.type == "cpu"
    chunk = max(blocksize, (_CHUNK // blocksize) * blocksize) if cpu else max(full, blocksize)
    work = _Work(min(chunk, max(full, blocksize)), blocksize) if cpu else None
    for s in range(0, full, chunk):
        e = min(s + chunk, full)
        if cpu:
            x = work.x[: e - s].view(-1, blocksize)
            x.copy_(flat[s:e].view(-1, blocksize))
        else:
            x = flat[s:e].to(torch.float32, copy=True).view(-1, blocksize)
        am = absmax[s // blocksize: e // blocksize]
        torch.amax(torch.abs(x, out=work.abs[: e - s].view(-1, blocksize)) if cpu else x.abs(), dim=1, out=am)
        x.mul_((1.0 / am.clamp(min=1e-38)).unsqueeze(1))
        _codes(x.view(-1), quant_type, out=codes[s:e], work=work)
    if full < n:
        x = flat[full:].to(torch.float32)
        am = x.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        codes[full:n] = _codes((x / am).contiguous(), quant_type)
    if n & 1:  # the peer pads the scaled values with a 0.0 before packing
        codes[n] = _codes_exact(torch.zeros(1, device=W.device), quant_type)[0]
    return _pack(codes).unsqueeze(1), absmax


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the first in the high nibble."""
    if _LITTLE and codes.device.type == "cpu":
        v = codes.view(torch.int16)  # (c0 | c1 << 8): the low byte of (v << 4 | v >> 8) is c0 << 4 | c1
        return torch.bitwise_or(v << 4, v >> 8).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


@functools.cache
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """fp32 [256, 2]: the two levels a packed byte holds (high nibble first) — one gather per byte."""
    code = code_table(quant_type)
    b = torch.arange(256)
    return torch.stack((code[b >> 4], code[b & 0x0F]), dim=1).to(device)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                    shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code[q] * absmax[block] in fp32, then cast to `dtype`."""
    n = 1
    for s in shape:
        n *= s
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    vals = _pair_table(quant_type, p.device).index_select(0, p.to(torch.int32)).view(-1)[:n]
    full = (n // blocksize) * blocksize
    out = torch.empty(n, dtype=torch.float32, device=p.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize].unsqueeze(1)).view(-1)
    if full < n:
        out[full:] = vals[full:] * absmax[-1]
    return out.view(shape).to(dtype)


# ------------------------------------------------------------------------------------ double quantization
@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """The native CPU kernel's nearest-level table: 65 536 evenly spaced points v_i = -1 + 2i/65535 (fp32),
    each mapped to the number of fp32 level-midpoints strictly below it."""
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    v = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.bucketize(v, mids).to(torch.uint8)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)], offset fp32 []).

    Matches bitsandbytes' CPU kernel, which picks the level through a 65 536-bin table rather than an exact
    nearest search: v = clamp(x * (1/absmax_group), -1, 1); bin = trunc(((v + 1) * 0.5) * 65535 + 0.5); an
    all-zero group gets code 0."""
    absmax = absmax.to(torch.float32)
    offset = absmax.cpu().mean().to(absmax.device)  # one reduction order on every device: same codes as on CPU
    A = absmax - offset
    n = A.numel()
    bs = NESTED_BLOCKSIZE
    nb = -(-n // bs)
    pad = nb * bs - n
    blocks = (torch.nn.functional.pad(A, (0, pad)) if pad else A).view(nb, bs)
    nested = blocks.abs().amax(dim=1)
    v = (blocks * (1.0 / nested).unsqueeze(1)).clamp_(-1.0, 1.0)
    t = ((v + 1.0) * 0.5) * 65535.0 + 0.5
    idx = t.nan_to_num_(0.0).to(torch.int32).clamp_(0, 65535)
    q = _dynamic_lut().to(A.device)[idx.long()]
    q = torch.where((nested == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].contiguous(), nested, offset


def dequantize_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: float | torch.Tensor,
                      code: torch.Tensor | None = None) -> torch.Tensor:
    """map[q] * nested_absmax[i // 256] + offset, in fp32."""
    code = dynamic_map() if code is None else code.to(torch.float32)
    n = qabsmax.numel()
    scale = nested_absmax.to(torch.float32).repeat_interleave(NESTED_BLOCKSIZE)[:n]
    out = code.to(qabsmax.device)[qabsmax.long()] * scale
    return out + torch.as_tensor(offset, dtype=torch.float32, device=out.device)
