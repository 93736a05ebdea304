"""fp8 codecs as pure functions of tensors: each layout's scale rule and rounding, written the way its producer
computes them, so that re-quantizing a merged weight gives the codes and scales the producer would have given
(spec: formats/fp8.md).

* plain    — Flux / Wan fp8 single files: the weight cast to float8 (e4m3fn or e5m2), no scale.
* scaled   — ComfyUI's scaled fp8 (`scaled_fp8` marker, `<m>.scale_weight`): scale = amax / fp8_max in fp32,
             q = (W / scale) cast; one scale per tensor (or per output row when the file stores one per row).
* tensor / channel — compressed-tensors (llm-compressor `FP8` / `FP8_DYNAMIC`): scale = amax / 448 computed
             in the scale's dtype (the model dtype), q = clamp(W / scale) cast, the weight first rounded to that
             dtype (what the producer holds); a zero scale becomes that dtype's eps.
* group / ct-block — compressed-tensors `group` (a scale per `group_size` inputs of a row, [out, in/g]) and
             `block` (a scale per bh×bw tile, [⌈out/bh⌉, ⌈in/bw⌉]): the tensor/channel rule per tile.
* block    — DeepSeek-V3 / Qwen3-FP8 / transformers FineGrainedFP8: per 128×128 tile, s = 448 / amax (1 for an
             all-zero tile), q = clamp(W · s) cast, `weight_scale_inv` = 1 / s in fp32. Partial edge tiles (a
             dimension not a multiple of the block) get a scale of their own, as DeepSeek's dequant reads them.

  With `scale_fmt: "ue8m0"` (DeepSeek-V3.1, DeepGEMM's `per_block_cast_to_fp8(use_ue8m0=True)`): amax
             clamped to ≥ 1e-4, `sf = amax / 448` rounded UP to a power of two, q = (W · (1/sf)) cast, stored
             `weight_scale_inv` = sf (fp32, or its E8M0 byte when the file stores uint8).

Every cast is torch's float8 conversion (round to nearest, ties to even). A plain cast clamps to ±fp8_max
first (torch saturates e4m3fn by itself but rounds e5m2 past its range to ±inf); a scaled one cannot pass the
rounding midpoint beyond fp8_max, so the producers' clamp is a no-op there (`cast_scaled`).
"""

from __future__ import annotations

import torch

FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
KINDS = ("plain", "scaled", "tensor", "channel", "group", "ct-block", "block")


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES.values()


# every float8 code's fp32 value, as torch's own conversion gives it (see to_float32)
_TABLES = {d: torch.arange(256, dtype=torch.uint8).view(d).to(torch.float32) for d in FP8_DTYPES.values()}


def to_float32(q: torch.Tensor) -> torch.Tensor:
    """`q.to(torch.float32)`, bit for bit, by table lookup: on CPU torch converts float8 one element at a time
    (measured: 12.8 ms for a 2816×1024 weight against 0.7 ms for the same bf16 upcast), while a lookup of the
    byte in a 256-entry table of that same conversion runs vectorized (2.7 ms)."""
    table = _TABLES.get(q.dtype)
    if table is None or q.device.type != "cpu":
        return q.to(torch.float32)
    codes = q.reshape(-1).view(torch.uint8)
    out = torch.empty(codes.shape, dtype=torch.float32)
    for i in range(0, codes.numel(), _STEP):  # in steps: the int32 indices are a small temporary, not 4 B/weight
        torch.index_select(table, 0, codes[i:i + _STEP].to(torch.int32), out=out[i:i + _STEP])
    return out.view(q.shape)


_STEP = 1 << 20


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Saturating round-to-nearest-even cast to a float8 dtype."""
    m = fp8_max(dtype)
    return x.clamp(-m, m).to(dtype)


def cast_scaled(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """The cast of a weight already divided by its amax-derived `scale`. With a normal (not subnormal) scale,
    |x| exceeds fp8_max by at most a few ulps of the scale's dtype (2⁻⁸ for bf16), short of the midpoint to
    the next step (464 for e4m3fn, 59392 for e5m2), so round-to-nearest lands on ±fp8_max and the producers'
    clamp changes nothing (it costs a pass); a subnormal scale is too coarse for that: clamped."""
    if bool((scale.abs() >= torch.finfo(scale.dtype).tiny).all()):
        return x.to(dtype)
    return cast(x, dtype)


def _absmax(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """max |x| without an |x| temporary (two reductions instead of a full-size allocation)."""
    if dim is None:
        lo, hi = torch.aminmax(x)
        return torch.maximum(hi, -lo)
    return torch.maximum(x.amax(dim=dim, keepdim=keepdim), -x.amin(dim=dim, keepdim=keepdim))


# --- plain --------------------------------------------------------------------------------------------------
def quantize_plain(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return cast(W.to(torch.float32), dtype)


def dequantize_plain(q: torch.Tensor) -> torch.Tensor:
    return to_float32(q)


# --- ComfyUI scaled -----------------------------------------------------------------------------------------
def quantize_scaled(W: torch.Tensor, dtype: torch.dtype, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 scale) with scale = amax / fp8_max per tensor (shape []) or per output row ([rows, 1]);
    an all-zero tensor or row gets scale 1."""
    W = W.to(torch.float32)
    amax = _absmax(W, dim=tuple(range(1, W.dim())), keepdim=True) if per_row else _absmax(W)
    scale = amax / fp8_max(dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return cast_scaled(W / scale, dtype, scale), scale


def dequantize_scaled(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(torch.float32)
    if s.dim() == 1 and s.numel() == q.shape[0] and q.dim() > 1:
        s = s.reshape(-1, *([1] * (q.dim() - 1)))
    return to_float32(q) * s


# --- compressed-tensors -------------------------------------------------------------------------------------
def quantize_ct(W: torch.Tensor, strategy: str, scale_dtype: torch.dtype,
                dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) as compressed-tensors' symmetric float observer + quantize compute them for a weight
    held in `scale_dtype`: strategy "tensor" → scale [1], "channel" → scale [rows, 1]."""
    x = W.to(scale_dtype)
    if strategy == "channel":
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    else:
        lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    zero = torch.zeros((), dtype=scale_dtype)
    amax = torch.maximum(torch.minimum(lo, zero).abs(), torch.maximum(hi, zero))
    m = fp8_max(dtype)
    scale = amax / torch.tensor(m, dtype=scale_dtype)  # max / (range / 2), range = 2·448
    eps = torch.finfo(scale_dtype).eps
    scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale_dtype), scale)
    return cast_scaled(x / scale, dtype, scale), scale


def quantize_ct_tiles(W: torch.Tensor, tile: tuple[int, int], scale_dtype: torch.dtype,
                      dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' `group` (tile (1, group_size)) and `block` (tile (bh, bw)) strategies: the
    tensor/channel rule (amax / 448 in the scale's dtype, eps for 0, the division in that dtype) per tile,
    partial edge tiles padded with zeros; scale [⌈rows/bh⌉, ⌈cols/bw⌉]."""
    rows, cols = W.shape
    t, (gr, gc) = _tiles(W.to(scale_dtype), tile)
    zero = torch.zeros((), dtype=scale_dtype)
    amax = torch.maximum(torch.minimum(t.amin(dim=(1, 3)), zero).abs(), torch.maximum(t.amax(dim=(1, 3)), zero))
    scale = amax / torch.tensor(fp8_max(dtype), dtype=scale_dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=scale_dtype), scale)
    q = cast_scaled(t / scale[:, None, :, None], dtype, scale)
    return q.reshape(gr * tile[0], gc * tile[1])[:rows, :cols].contiguous(), scale


def dequantize_ct(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(torch.float32)
    if s.dim() == 1 and s.numel() > 1:
        s = s.reshape(-1, 1)
    return to_float32(q) * s


# --- block (DeepSeek-V3 / FineGrainedFP8) -------------------------------------------------------------------
def block_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _tiles(W: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """W padded with zeros to whole tiles, viewed [R, bm, C, bn]."""
    rows, cols = W.shape
    gr, gc = block_grid(W.shape, block)
    pr, pc = gr * block[0] - rows, gc * block[1] - cols
    if pr or pc:
        W = torch.nn.functional.pad(W, (0, pc, 0, pr))
    return W.reshape(gr, block[0], gc, block[1]), (gr, gc)


def quantize_block(W: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 weight_scale_inv [ceil(rows/bm), ceil(cols/bn)])."""
    rows, cols = W.shape
    t, _ = _tiles(W.to(torch.float32), block)
    amax = _absmax(t, dim=(1, 3))
    m = fp8_max(dtype)
    s = torch.where(amax > 0, m / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    q = cast_scaled(t * s[:, None, :, None], dtype, 1.0 / s)
    q = q.reshape(t.shape[0] * block[0], t.shape[2] * block[1])[:rows, :cols].contiguous()
    return q, (1.0 / s).to(torch.float32)


def ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """Positive fp32 values rounded up to a power of two (the mantissa carried into the exponent)."""
    return ((x.float().contiguous().view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def e8m0_float(b: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes (uint8) as the fp32 powers of two they encode, 2^(b − 127)."""
    return torch.exp2(b.to(torch.float32) - 127.0)


def e8m0_bytes(sf: torch.Tensor) -> torch.Tensor:
    """fp32 powers of two as their UE8M0 bytes (the biased exponent)."""
    return (sf.float().contiguous().view(torch.int32) >> 23).to(torch.uint8)


def quantize_block_ue8m0(W: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 power-of-two scale_inv): DeepGEMM's rule (module docstring), partial tiles padded with 0."""
    rows, cols = W.shape
    t, _ = _tiles(W.to(torch.float32), block)
    sf = ceil_pow2(_absmax(t, dim=(1, 3)).clamp(min=1e-4) / fp8_max(dtype))
    q = cast_scaled(t * (1.0 / sf)[:, None, :, None], dtype, sf)
    return q.reshape(t.shape[0] * block[0], t.shape[2] * block[1])[:rows, :cols].contiguous(), sf


def dequantize_block(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    rows, cols = q.shape
    gr, gc = scale_inv.shape
    if rows == gr * block[0] and cols == gc * block[1]:  # whole tiles: broadcast, no full-size scale tensor
        t = to_float32(q).view(gr, block[0], gc, block[1])
        return t.mul_(scale_inv.to(torch.float32)[:, None, :, None]).view(rows, cols)
    s = scale_inv.to(torch.float32).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return to_float32(q) * s[:rows, :cols]
