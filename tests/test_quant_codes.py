"""Our NF4 / FP4 / int8 quantizers against bitsandbytes' own CPU ops (the oracle): same code books, same packed
bytes, same absmax and double-quantization statistics, and bitsandbytes dequantizes our tensors to exactly
what our dequantizer gives."""

from __future__ import annotations

import pytest
import torch

from loraport.quant.blockwise import dequantize_4bit, dequantize_absmax, quantize_4bit, quantize_absmax
from loraport.quant.bnb_layout import tensors_4bit
from loraport.quant.rowwise import dequantize_int8, quantize_int8
from loraport.quant.tables import code_table, dynamic_map, sorted_levels
from tests._quant_util import bnb_functional

F = bnb_functional()
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _weight(shape, dtype, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * scale
    W.view(-1)[:5] = 0.0  # a few exact zeros
    W.view(-1)[7] = W.abs().max() * -1.5  # a negative block maximum
    return W.to(dtype)


def test_code_books_equal_bitsandbytes():
    assert torch.equal(code_table("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_table("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("shape,dtype", [((128, 256), torch.bfloat16), ((96, 64), torch.float16),
                                         ((37, 70), torch.float32), ((33, 7), torch.bfloat16)])
def test_packed_codes_and_absmax_equal_bitsandbytes(quant_type, blocksize, shape, dtype):
    W = _weight(shape, dtype, seed=blocksize + shape[0])
    q_ref, st = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type)
    packed, absmax = quantize_4bit(W, quant_type, blocksize)
    assert packed.dtype == torch.uint8 and packed.shape == q_ref.shape  # [(n+1)//2, 1], partial/odd included
    assert torch.equal(packed, q_ref)
    assert torch.equal(absmax, st.absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_on_midpoints_and_signed_zeros(quant_type):
    """Scaled values exactly on every midpoint, ±0 and tiny ±values: the tie-breaking must be the peer's."""
    mids, _ = sorted_levels(quant_type)
    vals = torch.cat([mids, -mids, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 1.0, -1.0])])
    block = torch.zeros(64)
    block[: vals.numel()] = vals
    block[-1] = 1.0  # absmax 1: the scaled values are the values themselves
    q_ref, _ = F.quantize_4bit(block, blocksize=64, quant_type=quant_type)
    packed, _ = quantize_4bit(block, quant_type, 64)
    assert torch.equal(packed, q_ref)


@pytest.mark.parametrize("nblocks", [1, 255, 256, 257, 2048, 5000])
def test_double_quantization_equals_bitsandbytes(nblocks):
    W = _weight((nblocks, 64), torch.bfloat16, seed=nblocks)
    _, st = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, absmax = quantize_4bit(W, "nf4", 64)
    q, nested, offset = quantize_absmax(absmax)
    assert torch.equal(q, st.absmax)
    assert torch.equal(nested, st.state2.absmax)
    assert offset.item() == st.offset.item()
    ref = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    assert torch.equal(dequantize_absmax(q, nested, offset), ref)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_bitsandbytes_dequantizes_our_tensors_like_we_do(quant_type, double_quant, dtype, blocksize):
    """Serialize with our layout, rebuild bitsandbytes' QuantState from those tensors, dequantize with bnb.
    (Row length is a multiple of the blocksize, as in every real Linear: bnb 0.50.2's native CPU dequant
    mis-reads blocks that straddle rows — its own pure-torch op agrees with ours there.)"""
    shape = (64, 256)
    W = _weight(shape, torch.float32, seed=3)
    packed, absmax = quantize_4bit(W, quant_type, blocksize)
    nested = quantize_absmax(absmax) if double_quant else None
    tensors = tensors_4bit("w", shape, quant_type, blocksize, dtype, packed, absmax, nested)
    st = F.QuantState.from_dict({k: v for k, v in tensors.items() if k != "w"}, device="cpu")
    ref = F.dequantize_4bit(tensors["w"], st)
    am = dequantize_absmax(*nested) if nested else absmax
    ours = dequantize_4bit(packed, am, quant_type, blocksize, shape, dtype)
    assert ref.dtype == dtype and ref.shape == shape
    assert torch.equal(ref, ours)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 256), (3, 5), (1, 1000)])
def test_int8_rowwise_equals_bitsandbytes(dtype, shape):
    W = _weight(shape, dtype, seed=shape[0])
    W[0] = 0  # a zero row
    CB_ref, SCB_ref, _ = F.int8_vectorwise_quant(W.to(torch.float16))
    CB, SCB = quantize_int8(W)
    assert CB.dtype == torch.int8 and SCB.dtype == torch.float32
    assert torch.equal(CB, CB_ref) and torch.equal(SCB, SCB_ref)
    assert torch.equal(dequantize_int8(CB, SCB), F.int8_vectorwise_dequant(CB, SCB))


def test_quantize_is_device_agnostic_on_cpu_paths():
    """The exact-search path (used on CUDA) and the table path give the same codes."""
    from loraport.quant.blockwise import _codes, _codes_exact

    x = torch.empty(1 << 16).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    for qt in ("nf4", "fp4"):
        assert torch.equal(_codes(x, qt), _codes_exact(x, qt))


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_table_codes_at_every_cell_edge_and_midpoint(qt):
    """The table path against an exact search on the values where a table can go wrong: both ends of every
    16-bit cell in [-1, 1], and each level midpoint with its 4 fp32 neighbours on either side (ties go low)."""
    from loraport.quant.blockwise import _codes, _codes_exact
    from loraport.quant.tables import sorted_levels

    top = torch.arange(65536, dtype=torch.int64) << 16
    top = torch.where(top >= 2**31, top - 2**32, top).to(torch.int32)
    ends = torch.cat([top, top | 0xFFFF]).view(torch.float32)
    ends = ends[ends.abs() <= 1]
    mids, _ = sorted_levels(qt)
    near = [mids]
    up, down = mids.clone(), mids.clone()
    for _ in range(4):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        near += [up, down]
    x = torch.cat([ends, *near, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    x = torch.cat([x, x[: x.numel() % 2]])  # an even count
    assert torch.equal(_codes(x, qt), _codes_exact(x, qt))


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_path_gives_the_cpu_codes(quant_type):
    W = _weight((512, 1024), torch.bfloat16, seed=5)
    p_cpu, a_cpu = quantize_4bit(W, quant_type, 64)
    p_gpu, a_gpu = quantize_4bit(W.cuda(), quant_type, 64)
    assert torch.equal(p_gpu.cpu(), p_cpu) and torch.equal(a_gpu.cpu(), a_cpu)
    q, n, o = quantize_absmax(a_cpu)
    qg, ng, og = quantize_absmax(a_gpu)
    assert torch.equal(qg.cpu(), q) and torch.equal(ng.cpu(), n)
    CB, SCB = quantize_int8(W)
    CBg, SCBg = quantize_int8(W.cuda())
    assert torch.equal(CBg.cpu(), CB) and torch.equal(SCBg.cpu(), SCB)
