"""MXFP4 codec (OCP Microscaling, FP4 E2M1 elements, E8M0 shared scales, blocks of 32) as pure functions of
tensors, in gpt-oss's checkpoint layout (spec: formats/fp8.md, section MXFP4).

Stored per expert parameter `P` (transformers' `GptOssExperts`, logical shape [E, in, out]):

    P_blocks  uint8 [E, out, in/32, 16]   two E2M1 codes per byte: element 2k in the low nibble, 2k+1 in the high
    P_scales  uint8 [E, out, in/32]       E8M0: the block's scale is 2^(byte − 127)

Dequantization (transformers `integrations/mxfp4.py::convert_moe_packed_tensors`): code → FP4_VALUES[code],
× 2^(scale − 127), rows [E, out, in] transposed to [E, in, out].

Quantization matches the rule transformers' `quantize_to_mxfp4` calls (triton_kernels
`downcast_to_mxfp_torch`, default DequantScaleRoundingMode.ROUND_UP), restated here, not copied:
  1. the weight is rounded to bf16 first (transformers hands the kernel `w.to(bfloat16)`), then held in fp32;
  2. per block of 32 along `in`: `d = amax(|x|) / 6` in fp32, rounded UP to a power of two (the fp32 bit
     pattern's mantissa carried into the exponent), so every |x| / d ≤ 6 and nothing saturates; the scale
     byte is that power's biased exponent; an all-zero block stores byte 0 and codes 0;
  3. each element: `x / d` (computed as `x · (1/d)`) rounded to the nearest E2M1 value, ties away from zero
     (the kernel keeps two mantissa bits and adds one at the round bit), sign bit kept (a negative value that
     rounds to zero is code 8, −0).
The OCP MX spec's own reference picks `2^(⌊log2 amax⌋ − 2)` (round DOWN, then elements clamp to ±6); the
two agree whenever amax/6 is a power of two times ≤ 1.5 and differ by one exponent otherwise: gpt-oss's
producer (OpenAI) is not public, so the rule transformers itself uses when it quantizes is the one written.
"""

from __future__ import annotations

import torch

BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive magnitudes; a tie rounds up
SCALE_BIAS = 127
SCALE_NAN = 255  # E8M0's only non-number: a damaged or foreign scale


def dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [..., rows, G·32] of blocks [..., rows, G, 16] and scales [..., rows, G] (stored orientation)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)  # byte → (low, high) values
    vals = pairs.index_select(0, blocks.reshape(-1).to(torch.int32))  # [n, 2]: low nibble first
    vals = vals.view(*blocks.shape[:-1], 2 * blocks.shape[-1])
    # × 2^(byte − 127): a power of two, exact in fp32 for every byte < 255 (2^-127 is a subnormal), = ldexp
    pow2 = torch.ldexp(torch.ones(256, device=blocks.device), torch.arange(256, device=blocks.device) - SCALE_BIAS)
    vals.mul_(pow2.index_select(0, scales.reshape(-1).to(torch.int32)).view(*scales.shape, 1))
    return vals.view(*blocks.shape[:-2], blocks.shape[-2] * 2 * blocks.shape[-1])


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The logical fp32 parameter [E, in, out] (what transformers' dequantizing loader computes), one expert at
    a time so the temporaries stay one expert's size (a gpt-oss-120b gate_up_proj is 2 GB in fp32)."""
    E, rows, G, half = blocks.shape
    out = torch.empty(E, G * 2 * half, rows, dtype=torch.float32, device=blocks.device)
    for e in range(E):
        out[e] = dequantize_rows(blocks[e], scales[e]).T
    return out


def quantize_rows(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., rows, G, 16], scales uint8 [..., rows, G]) of W [..., rows, G·32] (see the module
    docstring for the rule). W must be finite with a last dimension divisible by 32."""
    x = W.to(torch.bfloat16).to(torch.float32).contiguous()
    *lead, cols = x.shape
    g = x.reshape(*lead, cols // BLOCK, BLOCK)
    amax = torch.maximum(g.amax(-1), -g.amin(-1))
    d = (amax / 6.0).contiguous()
    bits = (d.view(torch.int32) + 0x007FFFFF) & 0x7F800000  # round up to a power of two (0 stays 0)
    scale = bits.view(torch.float32)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    q = g * inv.unsqueeze(-1)
    # the code's magnitude = how many midpoints are ≤ |q| (a tie rounds up); they all lie on the 0.25 grid,
    # so that count depends only on ⌊4|q|⌋ (0..24, |q| ≤ 6): one table lookup instead of a search
    quarters = torch.arange(25, dtype=torch.float32, device=q.device) / 4
    table = torch.bucketize(quarters, torch.tensor(_MIDPOINTS, device=q.device), right=True).to(torch.uint8)
    k = (q.abs() * 4).to(torch.int32).clamp_(max=24)
    codes = table.index_select(0, k.reshape(-1)).view(k.shape) | (torch.signbit(q).to(torch.uint8) << 3)
    codes = codes.reshape(*lead, cols // BLOCK, BLOCK // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks.contiguous(), (bits >> 23).to(torch.uint8)


def quantize(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of a logical parameter P [E, in, out] (`in` divisible by 32), one expert at a time."""
    E, inn, rows = P.shape
    blocks = torch.empty(E, rows, inn // BLOCK, BLOCK // 2, dtype=torch.uint8, device=P.device)
    scales = torch.empty(E, rows, inn // BLOCK, dtype=torch.uint8, device=P.device)
    for e in range(E):
        blocks[e], scales[e] = quantize_rows(P[e].T)
    return blocks, scales


def scale_overflows(P: torch.Tensor) -> bool:
    """A block whose amax / 6 rounds up past 2^127 has no E8M0 scale (byte 255 is NaN)."""
    return bool((P.abs().amax() / 6.0 > 2.0 ** 127).item())
