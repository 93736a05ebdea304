"""The code books of bitsandbytes' quantized types, as data.

* NF4: 16 normal-quantile levels in [-1, 1], sorted, so a 4-bit code is the index of its value.
* FP4: bitsandbytes' 4-bit float (1 sign bit, bias-2 exponent), listed in *bit-pattern* order: code = index;
  bit 3 is the sign, code 8 is -0.
* DYNAMIC: bitsandbytes' signed 8-bit "dynamic tree" map (not IEEE FP8); used for double quantization of the
  4-bit block absmax. 256 sorted values, 0.0 at index 127, 1.0 at index 255, min -0.99296875.

Quantizing a value x already scaled into [-1, 1] picks the nearest level. For the 4-bit types this is "number
of midpoints strictly below x" over the *sorted* levels (a tie goes to the lower level), which is what
bitsandbytes' CPU/default op computes; FP4 maps the sorted position back to its bit pattern.
"""

from __future__ import annotations

import functools

import torch

# NF4 levels (index = code). Also written to `weight.quant_map`.
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 magnitudes before normalisation, by the low three bits of the code; the table is value / 12 in fp32.
FP4_RAW: tuple[float, ...] = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                              -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# FP4 codes in ascending order of value. The two zeros tie; bitsandbytes' CPU op orders +0 (code 0) before
# -0 (code 8), so a scaled value in (-mid, 0] gets code 0 and one in (0, +mid] gets code 8 (-0).
FP4_SORTED_CODES: tuple[int, ...] = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


@functools.cache
def code_table(quant_type: str) -> torch.Tensor:
    """fp32 levels indexed by code (the `quant_map` tensor bitsandbytes stores)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(FP4_RAW, dtype=torch.float32) / 12.0
    raise ValueError(f"unknown 4-bit type {quant_type!r}")


@functools.cache
def sorted_levels(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 midpoints between consecutive sorted levels [15], code of each sorted position uint8 [16])."""
    table = code_table(quant_type)
    order = torch.arange(16) if quant_type == "nf4" else torch.tensor(FP4_SORTED_CODES)
    levels = table[order]
    mids = (levels[:-1] + levels[1:]) / 2  # fp32 arithmetic, like the peer
    return mids, order.to(torch.uint8)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (max_exponent_bits=7): for each exponent e = 0..6, the midpoints
    of linspace(0.1, 1, 2**e + 1) scaled by ±10**(e-6); plus 0 and 1.0; sorted; fp32."""
    vals: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        vals += (10 ** (e - 6) * mids).tolist()
        vals += (-(10 ** (e - 6)) * mids).tolist()
    vals += [0.0, 1.0]
    return torch.tensor(sorted(vals), dtype=torch.float32)
