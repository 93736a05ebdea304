"""Quantized ONNX exports: int8 (DequantizeLinear per channel, opset 21) and int4 (com.microsoft.MatMulNBits).

Two separate claims: (1) layout — onnxruntime computes exactly what torch computes with the same
dequantized weights, so the packing / axes / scales are right; (2) accuracy — against the fp32 PEFT
reference the error stays within the bound `loraport validate --tolerance auto` states."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from loraport.onnx.quantize import (dequantize_int4_blocks, dequantize_int8, quantize_int4_blocks,
                                    quantize_int8_per_channel)
from loraport.parity import TOLERANCES, compare, judge
from tests._onnx_util import ADAPTERS, LLAMA, export_kw, feeds, max_abs, ort_run, torch_logits

PLAIN = ADAPTERS / "llama_plain"


def test_int4_pack_roundtrip_exact_on_grid():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 64), generator=g).float()
    scale = 0.125
    W = q * scale
    W[:, 0] = -8 * scale  # make absmax/7 != scale impossible to hit accidentally: check dequant reproduces W
    packed, scales = quantize_int4_blocks(W, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 2, 16)
    back = dequantize_int4_blocks(packed, scales, 64)
    step = scales.abs().repeat_interleave(32, dim=1)  # signed scales (absmax / -8)
    assert torch.all((back - W).abs() <= step / 2 + 1e-7)


def test_int4_padding_and_int8_error_bounds():
    W = torch.randn(7, 40)
    packed, scales = quantize_int4_blocks(W, 32)
    assert packed.shape == (7, 2, 16)  # K padded to 64
    back = dequantize_int4_blocks(packed, scales, 40)
    assert back.shape == W.shape
    # signed absmax / -8 (onnxruntime's scale): the +7 end of the -8..7 grid clamps, so one step, not half
    assert torch.all((back - W).abs() <= scales.abs().repeat_interleave(32, dim=1)[:, :40] + 1e-6)
    q, s = quantize_int8_per_channel(W)
    assert q.shape == (40, 7) and q.dtype == torch.int8
    assert torch.all((dequantize_int8(q, s) - W).abs() <= s[:, None] / 2 + 1e-6)


def _dequantized_torch_model(mode: str):
    import peft
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(LLAMA), dtype=torch.float32)
    m = peft.PeftModel.from_pretrained(m, str(PLAIN)).merge_and_unload().eval()
    qm = copy.deepcopy(m)
    with torch.no_grad():
        for mod in qm.modules():
            if isinstance(mod, torch.nn.Linear):
                W = mod.weight.data
                if mode == "int4":
                    p, s = quantize_int4_blocks(W, 32)
                    mod.weight.data = dequantize_int4_blocks(p, s, W.shape[1])
                else:
                    q, s = quantize_int8_per_channel(W)
                    mod.weight.data = dequantize_int8(q, s)
    return m, qm


@pytest.mark.parametrize("mode,op", [("int8", "DequantizeLinear"), ("int4", "MatMulNBits")])
def test_quantized_export_layout_and_bound(mode, op):
    out = export_kw(LLAMA, [(PLAIN, 1.0)], quantize=mode)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 21
    qnodes = [n for n in m.graph.node if n.op_type == op]
    assert len(qnodes) == 15  # 14 projections + lm_head
    if mode == "int4":
        assert all(n.domain == "com.microsoft" for n in qnodes)
    else:
        inits = {t.name: t for t in m.graph.initializer}
        assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in qnodes)
    f = feeds(2, 10, seed=4)
    got = ort_run(out / "model.onnx", f, qdq_level="0")
    fp32, deq = _dequantized_torch_model(mode)
    # (1) layout: ORT == torch with the same dequantized weights
    assert max_abs(got, torch_logits(deq, f)) <= 1e-4
    # (2) accuracy vs the fp32 merged model, within the stated auto bound
    metrics = compare(got, torch_logits(fp32, f))
    tol = dict(TOLERANCES[mode], relative=True)
    assert judge(metrics, tol), metrics
    assert metrics["max_abs"] > 1e-4  # it is really quantized
