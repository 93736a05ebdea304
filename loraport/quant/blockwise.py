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

Speed (CPU): the nearest-level search is two 65 536-entry tables indexed by the top 16 bits of the scaled fp32
value (the cell's lower position and the one midpoint inside it) and one exact comparison — no search, no
branches. The work is done in int32 end to end (the comparison's sign bit is subtracted as -1/0; two codes
are packed from an int64 view), because mixed-width integer ops are several times slower in torch. Chunks of
2**19 elements run with reused buffers on Python threads that each keep torch single-threaded
(`run_chunks`): few, long ops per thread, so the threads neither wait on the GIL nor oversubscribe the cores.
On CUDA an exact search is used directly (same codes).
"""

from __future__ import annotations

import functools
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from loraport.quant.tables import code_table, dynamic_map, sorted_levels
from loraport.threads import cores

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_LITTLE = sys.byteorder == "little"
_SERIAL = 1 << 19  # elements per CPU chunk (each worker thread runs torch single-threaded, see run_chunks)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


# ------------------------------------------------------------------------------------------- 4-bit codes
@functools.cache
def _cell_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 16-bit cell (all fp32 values sharing those top 16 bits): the sorted position of its lower end
    (uint8 [65536]) and the one level midpoint inside it (fp32 [65536], +inf when none). For x in the cell,
    sorted position = low[cell] + (x > mid[cell]): a cell is far narrower than the gap between midpoints."""
    keys = torch.arange(65536, dtype=torch.int64) << 16
    keys = torch.where(keys >= 2**31, keys - 2**32, keys)
    a = keys.to(torch.int32).view(torch.float32)
    b = (keys | 0xFFFF).to(torch.int32).view(torch.float32)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)  # negative cells run downwards
    mids, _ = sorted_levels(quant_type)
    p_lo, p_hi = torch.bucketize(lo, mids), torch.bucketize(hi, mids)
    nan = torch.isnan(a) | torch.isnan(b)
    if bool(((p_hi - p_lo)[~nan] > 1).any()):
        raise AssertionError("a 16-bit cell spans two midpoints")
    thr = torch.full((65536,), float("inf"))
    amb = (p_hi > p_lo) & ~nan
    thr[amb] = mids[p_lo[amb]]
    return torch.where(nan, 0, p_lo).to(torch.uint8), thr


@functools.cache
def _signed_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The cell tables indexed by (fp32 bits >> 16) + 32768 — the arithmetic shift of the signed bit pattern,
    made non-negative — as (low int32, mid fp32, sorted position -> code int32 or None for NF4)."""
    low, mid = _cell_tables(quant_type)
    low = torch.cat([low[32768:], low[:32768]]).to(torch.int32)
    mid = torch.cat([mid[32768:], mid[:32768]])
    order = None if quant_type == "nf4" else sorted_levels(quant_type)[1].to(torch.int32)
    return low, mid, order


def _codes_exact(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    mids, order = sorted_levels(quant_type)
    pos = torch.bucketize(scaled, mids.to(scaled.device))
    return order.to(scaled.device)[pos]


class _Work:
    """Scratch buffers of one CPU worker, reused for every chunk it processes."""

    def __init__(self, chunk: int, blocksize: int):
        self.x = torch.empty(chunk, dtype=torch.float32)
        self.abs = torch.empty(chunk, dtype=torch.float32)
        self.am = torch.empty(chunk // blocksize + 1, dtype=torch.float32)
        self.key = torch.empty(chunk, dtype=torch.int32)
        self.thr = torch.empty(chunk, dtype=torch.float32)
        self.c = torch.empty(chunk + 2, dtype=torch.int32)
        self.p64a = torch.empty(chunk // 2 + 1, dtype=torch.int64)
        self.p64b = torch.empty(chunk // 2 + 1, dtype=torch.int64)


def _codes32(scaled: torch.Tensor, quant_type: str, work: _Work) -> torch.Tensor:
    """int32 codes (a view into work's buffers) of CPU fp32 values already scaled into [-1, 1] (1-D).

    Two table lookups by the top 16 bits and one exact comparison, all element-wise: position = low[cell] -
    signbit(mid[cell] - x) read as -1/0, which is x > mid for finite values (the difference of two fp32 rounds
    to 0 only when they are equal); FP4 then maps sorted positions to its bit patterns."""
    m = scaled.numel()
    key, thr, c = work.key[:m], work.thr[:m], work.c[:m]
    low, mid, order = _signed_tables(quant_type)
    torch.bitwise_right_shift(scaled.view(torch.int32), 16, out=key)
    key.add_(32768)
    torch.index_select(low, 0, key, out=c)
    torch.index_select(mid, 0, key, out=thr)
    torch.sub(thr, scaled, out=thr)
    step = thr.view(torch.int32)
    step.bitwise_right_shift_(31)  # -1 where x > mid, else 0
    c.sub_(step)
    if order is not None:
        torch.index_select(order, 0, c, out=key)
        c.copy_(key)
    return c


def _codes(scaled: torch.Tensor, quant_type: str, out: torch.Tensor | None = None,
           work: _Work | None = None) -> torch.Tensor:
    """uint8 codes of fp32 values already scaled into [-1, 1] (1-D), written to `out` when given."""
    if scaled.device.type != "cpu":
        c = _codes_exact(scaled, quant_type)
        return c if out is None else out.copy_(c)
    c = _codes32(scaled.contiguous(), quant_type, work if work is not None else _Work(scaled.numel(), 1))
    return c.to(torch.uint8) if out is None else out.copy_(c)


def quantize_4bit(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)]) on W's device."""
    check_blocksize(blocksize)
    flat = W.reshape(-1)
    n = flat.numel()
    full = (n // blocksize) * blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=W.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=W.device)
    if W.device.type == "cpu":
        chunk = max(blocksize, (_SERIAL // blocksize) * blocksize)

        def job(s: int, work: _Work) -> None:
            e = min(s + chunk, full)
            nb = (e - s) // blocksize
            x = work.x[: e - s].view(nb, blocksize)
            x.copy_(flat[s:e].view(nb, blocksize))
            am = absmax[s // blocksize: e // blocksize]
            torch.amax(torch.abs(x, out=work.abs[: e - s].view(nb, blocksize)), dim=1, out=am)
            r = work.am[:nb]
            torch.reciprocal(torch.clamp(am, min=1e-38, out=r), out=r)  # the peer multiplies by 1/absmax
            x.mul_(r.unsqueeze(1))
            c = _codes32(x.view(-1), quant_type, work)
            _pack32(c, packed[s // 2: e // 2], work)

        run_chunks(range(0, full, chunk), job, lambda: _Work(chunk, blocksize))
    elif full:
        x = flat[:full].to(torch.float32).view(-1, blocksize)
        absmax[: full // blocksize] = am = x.abs().amax(dim=1)
        x = x * (1.0 / am.clamp(min=1e-38)).unsqueeze(1)
        packed[: full // 2] = _pack(_codes_exact(x.view(-1), quant_type))
    if full < n:  # a partial last block (scaled by a true division, as the peer does) and an odd count
        x = flat[full:].to(torch.float32)
        am = x.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        tail = _codes_exact(x / am, quant_type)
        if (n - full) & 1:  # the peer pads the scaled values with a 0.0 before packing
            tail = torch.cat([tail, _codes_exact(torch.zeros(1, device=W.device), quant_type)])
        packed[full // 2:] = _pack(tail)
    return packed.unsqueeze(1), absmax


def _pack32(codes: torch.Tensor, out: torch.Tensor, work: _Work) -> None:
    """Pack an even number of int32 codes into `out` (uint8), the first of each pair in the high nibble.
    Little-endian: an int64 view holds (c0 | c1 << 32), and the low byte of (v << 4 | v >> 32) is c0 << 4 | c1
    (the uint8 cast keeps the low byte)."""
    if not _LITTLE:
        out.copy_(_pack(codes.to(torch.uint8)))
        return
    v = codes.view(torch.int64)
    m = v.numel()
    a, b = work.p64a[:m], work.p64b[:m]
    torch.bitwise_left_shift(v, 4, out=a)
    torch.bitwise_right_shift(v, 32, out=b)
    torch.bitwise_or(a, b, out=a)
    out.copy_(a)


def run_chunks(starts, job, make_work) -> None:
    """Run job(start, work) for every start, spread over one Python thread per core (at most 8),
    each of which first sets torch to one intra-op thread for itself (a per-thread setting: the caller's
    threads are untouched). Each chunk is a handful of long element-wise ops, so the threads spend little
    time waiting on the GIL (torch releases it inside ops), and nothing spins waiting for a busy core — one
    big multi-threaded op per step stalls when other processes share the cores. A single chunk runs inline."""
    starts = list(starts)
    workers = max(1, min(cores(), 8, len(starts)))
    if workers == 1:
        work = make_work()
        for s in starts:
            job(s, work)
        return
    local = threading.local()

    def run(s: int) -> None:
        w = getattr(local, "work", None)
        if w is None:
            torch.set_num_threads(1)
            w = local.work = make_work()
        job(s, w)

    with ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(run, s) for s in starts]:
            f.result()


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the first in the high nibble (an even number of uint8 codes)."""
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
    n = absmax.numel()
    bs = NESTED_BLOCKSIZE
    nb = -(-n // bs)
    q = torch.empty(nb * bs, dtype=torch.uint8, device=absmax.device)
    nested = torch.empty(nb, dtype=torch.float32, device=absmax.device)
    lut = _dynamic_lut().to(absmax.device)
    groups = max(1, _SERIAL // bs) if absmax.device.type == "cpu" else nb

    def job(g: int, _work=None) -> None:
        h = min(g + groups, nb)
        a = absmax[g * bs: h * bs] - offset
        if a.numel() < (h - g) * bs:
            a = torch.nn.functional.pad(a, (0, (h - g) * bs - a.numel()))
        blocks = a.view(h - g, bs)
        m = nested[g:h]
        torch.amax(blocks.abs(), dim=1, out=m)
        v = blocks.mul_((1.0 / m).unsqueeze(1)).clamp_(-1.0, 1.0)
        v.add_(1.0).mul_(0.5).mul_(65535.0).add_(0.5)  # the peer's order of fp32 operations, in place
        idx = v.nan_to_num_(0.0).to(torch.int32).clamp_(0, 65535).view(-1)
        out = q[g * bs: h * bs]
        torch.index_select(lut, 0, idx, out=out)
        zero = m == 0
        if bool(zero.any()):
            out.view(h - g, bs)[zero] = 0

    if absmax.device.type == "cpu":
        run_chunks(range(0, nb, groups), job, lambda: None)
    else:
        job(0)
    return q[:n], nested, offset


def dequantize_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, offset: float | torch.Tensor,
                      code: torch.Tensor | None = None) -> torch.Tensor:
    """map[q] * nested_absmax[i // 256] + offset, in fp32."""
    code = dynamic_map() if code is None else code.to(torch.float32)
    n = qabsmax.numel()
    scale = nested_absmax.to(torch.float32).repeat_interleave(NESTED_BLOCKSIZE)[:n]
    out = code.to(qabsmax.device)[qabsmax.long()] * scale
    return out + torch.as_tensor(offset, dtype=torch.float32, device=out.device)
