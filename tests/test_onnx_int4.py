"""int4 weights for MatMulNBits (loraport/onnx/quantize.py) against onnxruntime's own quantizer
(`quantize_matmul_4bits`, what MatMul4BitsQuantizer calls): codes, scales and zero points bit for bit, the
error-minimizing search never worse, and graphs with zero points / accuracy_level run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits

from loraport.errors import BadInputError
from loraport.onnx.quantize import Int4Options, dequantize_int4, quantize_int4, quantized_tensors, rewrite


def _ort(W: torch.Tensor, block: int, symmetric: bool):
    """onnxruntime's quantizer on W [N, K] (it takes the MatMul's B, [K, N], zero-padded to whole blocks)."""
    N, K = W.shape
    kb = -(-K // block)
    w = np.ascontiguousarray(np.pad(W.t().numpy(), ((0, kb * block - K), (0, 0))), dtype=np.float32)
    packed = np.zeros((N, kb, block // 2), np.uint8)
    scales = np.zeros((N, kb), np.float32)
    zp = np.zeros((N, (kb + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zp, block, N, kb * block, symmetric)
    return packed, scales, zp


def _weights(seed: int, K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(24, K, generator=g) * torch.rand(24, 1, generator=g) * 3
    W[0] = 0  # all-zero blocks: scale 0
    W[1, :16] = 0.5  # constant blocks: min = max
    W[2, :8], W[2, 8:16] = 1.0, -1.0  # signed-absmax ties: the first wins
    W[3] = torch.distributions.StudentT(3.0).sample((K,))  # heavy tails
    return W


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
def test_codes_equal_onnxruntime_quantizer(block, symmetric):
    W = _weights(block, 300)  # K = 300: the last block is zero-padded for every block size
    p, s, z = _ort(W, block, symmetric)
    P, S, Z = quantize_int4(W, Int4Options(block=block, symmetric=symmetric))
    assert np.array_equal(P.numpy(), p) and np.array_equal(S.numpy(), s)
    assert (Z is None) if symmetric else np.array_equal(Z.numpy(), z)


def _rms(a, b) -> float:
    return float((a - b).square().mean().sqrt())


@pytest.mark.parametrize("symmetric", [True, False])
def test_search_never_worse_and_better_on_average(symmetric):
    W = _weights(7, 512)
    for block in (16, 64, 256):
        p, s, z = _ort(W, block, symmetric)
        ref = dequantize_int4(torch.from_numpy(p), torch.from_numpy(s), None if symmetric else torch.from_numpy(z), 512)
        P, S, Z = quantize_int4(W, Int4Options(block=block, symmetric=symmetric, search=True))
        got = dequantize_int4(P, S, Z, 512)
        per_row_ref = (ref - W).square().sum(1)
        assert torch.all((got - W).square().sum(1) <= per_row_ref * (1 + 1e-6) + 1e-12)
        assert _rms(got, W) < 0.97 * _rms(ref, W), block


def _linear_model(N: int, K: int) -> onnx.ModelProto:
    """y = x @ W.T as torch.onnx writes nn.Linear without optimization: Transpose(W) feeding MatMul."""
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    g = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("opts", [Int4Options(block=16, symmetric=False, accuracy_level=4),
                                  Int4Options(block=64, symmetric=True, search=True),
                                  Int4Options(block=32, symmetric=False, search=True, accuracy_level=1)])
def test_matmulnbits_graph_runs_in_onnxruntime(opts):
    N, K = 24, 96
    W = _weights(1, K)
    m = _linear_model(N, K)
    entries = rewrite(m, {"w": (N, K)}, "int4", TensorProto.FLOAT, int4=opts)
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits")
    assert len(node.input) == (3 if opts.symmetric else 4)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["block_size"] == opts.block and attrs.get("accuracy_level") == opts.accuracy_level
    tensors = quantized_tensors(entries["w"], W, torch.float32)
    m.graph.initializer.extend(numpy_helper.from_array(t.numpy(), name) for name, t in tensors)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(3))
    y = sess.run(None, {"x": x.numpy()})[0]
    P, S, Z = quantize_int4(W, opts)
    want = x @ dequantize_int4(P, S, Z, K).t()
    tol = 2e-2 if opts.accuracy_level == 4 else 1e-4  # level 4 quantizes the activations to int8
    assert np.abs(y - want.numpy()).max() <= tol * float(want.abs().max())


@pytest.mark.parametrize("bad", [{"block": 24}, {"block": 8}, {"accuracy_level": 7}])
def test_bad_int4_options_refused(bad):
    with pytest.raises(BadInputError):
        rewrite(_linear_model(24, 96), {"w": (24, 96)}, "int4", TensorProto.FLOAT, int4=Int4Options(**bad))


def _export_args(tmp_path, *int4):
    from _gguf_base_util import LLAMA

    return ("convert", "--to", "onnx", "--base", LLAMA, "--adapter", LLAMA.parent.parent / "peft" / "llama_lora",
            "--out", tmp_path / "onnx", "--quantize", "int4", *[a for o in int4 for a in ("--int4", o)])


@pytest.mark.parametrize("opts,msg", [(["blok=16"], "unknown int4 option"), (["block=48"], "power of two"),
                                      (["search=maybe"], "integer or true/false")])
def test_cli_int4_options_refused_before_work(tmp_path, opts, msg):
    from _peft_util import cli

    res = cli(*_export_args(tmp_path, *opts))
    assert res.exit_code == 2 and msg in res.stderr and not (tmp_path / "onnx").exists()


@pytest.mark.slow  # ~20 s: a graph capture (pytest -m slow tests/test_onnx_int4.py)
def test_cli_asymmetric_search_export_validates(tmp_path):
    from _gguf_base_util import LLAMA
    from _peft_util import cli

    res = cli(*_export_args(tmp_path, "block=16", "symmetric=false", "search=true", "accuracy_level=4"))
    assert res.exit_code == 0, res.output
    m = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 15 and all(len(n.input) == 4 for n in nodes)
    res = cli("validate", tmp_path / "onnx", "--base", LLAMA, "--adapter", LLAMA.parent.parent / "peft" / "llama_lora")
    assert res.exit_code == 0, res.output
