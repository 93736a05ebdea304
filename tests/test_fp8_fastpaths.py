"""The fp8 merge's fast paths give exactly what the slow ones they replace give: the table decode of float8 codes
(loraport.quant.fp8.to_float32) is `q.to(torch.float32)` bit for bit, and the byte check of float8 outputs for
NaN/Inf (loraport.finite.may_be_nonfinite) agrees with torch.isfinite, for every one of the 256 codes of each
float8 dtype, in any memory layout (bench/fp8_bench.py measures what they save)."""

from __future__ import annotations

import pytest
import torch

from loraport.finite import count_nonfinite, may_be_nonfinite
from loraport.quant import fp8 as F

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("step", [None, 97])  # 97: the lookup in many steps, one ending mid-row
@pytest.mark.parametrize("dtype", DTYPES)
def test_table_decode_is_torch_conversion_bit_for_bit(dtype, step, monkeypatch):
    if step:
        monkeypatch.setattr(F, "_STEP", step)
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    assert torch.equal(_bits(F.to_float32(codes)), _bits(codes.to(torch.float32)))  # NaN payloads included
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (96, 40), generator=g, dtype=torch.uint8).view(dtype)
    for view in (q, q.t(), q[::3, 1::2], q[5, 7], q[:0]):  # strided, transposed, 0-d, empty
        got = F.to_float32(view)
        assert got.shape == view.shape and got.dtype == torch.float32
        assert torch.equal(_bits(got), _bits(view.to(torch.float32)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_table_decode_serves_every_dequantizer(dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (256, 384), generator=g, dtype=torch.uint8).view(dtype)
    s_block = torch.rand(2, 3, generator=g) + 0.5
    want = q.to(torch.float32).view(2, 128, 3, 128).mul(s_block[:, None, :, None]).view(256, 384)
    assert torch.equal(_bits(F.dequantize_block(q, s_block)), _bits(want))
    s_row = torch.rand(256, 1, generator=g).bfloat16()
    assert torch.equal(_bits(F.dequantize_ct(q, s_row)), _bits(q.to(torch.float32) * s_row.float()))
    assert torch.equal(_bits(F.dequantize_plain(q)), _bits(q.to(torch.float32)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_byte_check_matches_isfinite_for_every_code(dtype):
    for code in range(256):
        t = torch.zeros(4, 6, dtype=torch.uint8)
        t[2, 3] = code
        t = t.view(dtype)
        bad = not bool(torch.isfinite(t.to(torch.float16)).all())
        assert may_be_nonfinite(t) is bad, code
        assert may_be_nonfinite(t.t()) is bad, code  # a non-contiguous view
        assert count_nonfinite(t) == int(bad)
