"""What we write for a quantized model equals what transformers + bitsandbytes themselves save for the same
weights (fixtures made with BitsAndBytesConfig + save_pretrained), key by key and byte by byte."""

from __future__ import annotations

import json

import pytest
import torch

from loraport.quant import get_quantizer
from loraport.quant.bnb_layout import QS_PREFIX
from loraport.safetensors_io import SafetensorsFile
from tests._quant_util import BF16, INT8, NF4_DQ


def _quantize_all(q, src: SafetensorsFile) -> dict[str, torch.Tensor]:
    out = {}
    for k in src.names():
        v = src.get(k)
        ents = q.entries(k, tuple(v.shape), None)
        if ents is None:
            out[k] = v
            continue
        t = q.quantize(k, v.float())
        assert list(t) == [n for n, _, _ in ents]
        for n, dt, sh in ents:
            assert t[n].dtype == dt and tuple(t[n].shape) == tuple(sh), n
        out.update(t)
    return out


@pytest.mark.parametrize("name,folder,opts", [("nf4", NF4_DQ, {"double_quant": True}), ("int8", INT8, {})])
def test_tensors_equal_transformers_save(name, folder, opts):
    q = get_quantizer(name, **opts)
    ours = _quantize_all(q, SafetensorsFile(BF16 / "model.safetensors"))
    ref_f = SafetensorsFile(folder / "model.safetensors")
    assert set(ours) == set(ref_f.names())
    for k in ref_f.names():
        ref, mine = ref_f.get(k), ours[k]
        assert mine.dtype == ref.dtype, k
        if QS_PREFIX in k:
            # the double-quant JSON is padded with spaces to a length fixed before quantizing
            a, b = bytes(ref.tolist()), bytes(mine.tolist())
            assert b.rstrip(b" ") == a and json.loads(b) == json.loads(a)
            if "nested_offset" not in json.loads(a):
                assert b == a
        else:
            assert mine.shape == ref.shape and torch.equal(mine, ref), k


@pytest.mark.parametrize("name,folder,opts", [("nf4", NF4_DQ, {"double_quant": True}), ("int8", INT8, {})])
def test_quantization_config_matches_transformers(name, folder, opts):
    q = get_quantizer(name, **opts)
    _quantize_all(q, SafetensorsFile(BF16 / "model.safetensors"))
    ours = q.config_update(json.loads((BF16 / "config.json").read_text()))["quantization_config"]
    ref = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert list(ours) == list(ref)  # same keys, same order
    skip = ours.pop("llm_int8_skip_modules")
    assert ref.pop("llm_int8_skip_modules") is None
    assert ours == ref
    # we declare every unquantized 2-D weight's module, and lm_head (transformers' default skip)
    assert skip == ["lm_head", "model.embed_tokens"]


def test_entries_decide_what_stays_unquantized():
    q = get_quantizer("nf4")
    assert q.entries("model.layers.0.mlp.down_proj.weight", (64, 128)) is not None
    for name, shape, hint in [("model.embed_tokens.weight", (128, 64), None), ("lm_head.weight", (128, 64), None),
                              ("model.norm.weight", (64,), None), ("model.layers.0.self_attn.q_proj.bias", (64,), None),
                              ("transformer.h.0.attn.c_attn.weight", (64, 192), "conv1d"),
                              ("model.odd.weight", (3, 5), None)]:
        assert q.entries(name, shape, hint) is None, name
    assert q.config_update({})["quantization_config"]["llm_int8_skip_modules"] == [
        "lm_head", "model.embed_tokens", "model.odd", "transformer.h.0.attn.c_attn"]


def test_bad_options_are_user_errors():
    from loraport.errors import BadInputError

    with pytest.raises(BadInputError, match="blocksize"):
        get_quantizer("nf4", blocksize=48)
    with pytest.raises(BadInputError, match="unknown quantization"):
        get_quantizer("int4")
    with pytest.raises(BadInputError, match="inf/NaN"):
        q = get_quantizer("int8")
        q.entries("a.weight", (2, 2))
        q.quantize("a.weight", torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


@pytest.mark.parametrize("name,opts", [("nf4", {}), ("nf4", {"double_quant": True}), ("int8", {})])
def test_report_metrics_on_sampled_rows_match_full_metrics(monkeypatch, name, opts):
    import loraport.quant.quantizer as Q

    g = torch.Generator().manual_seed(0)
    W = torch.randn(512, 256, generator=g) * 0.02
    dW = (torch.randn(512, 4, generator=g) @ torch.randn(4, 256, generator=g)) * 1e-3
    rows = {}
    for cap in (1 << 30, 64 * 256):
        monkeypatch.setattr(Q, "METRIC_ELEMS", cap)
        q = get_quantizer(name, **opts)
        q.entries("m.weight", (512, 256))
        out = q.quantize("m.weight", W + dW, base32=W)
        rows[cap] = q.report()[0]
        assert out["m.weight"].shape[0] in (512, 512 * 256 // 2)  # the written tensor is always complete
    full, sampled = rows[1 << 30], rows[64 * 256]
    assert "metric_rows" not in full and sampled["metric_rows"] == 64
    assert abs(sampled["rel_error"] / full["rel_error"] - 1) < 0.1
    assert abs(sampled["delta_retained"] - full["delta_retained"]) < 0.15


def test_report_table_lists_layers_total_and_warning():
    from loraport.quant.report import format_table

    from loraport.quant.blockwise import dequantize_4bit, quantize_4bit

    q = get_quantizer("nf4")
    W = dequantize_4bit(*quantize_4bit(torch.randn(64, 128) * 0.02), "nf4", 64, (64, 128))  # on the grid
    for i in range(3):
        q.entries(f"l{i}.weight", (64, 128))
        q.quantize(f"l{i}.weight", W + torch.randn(64, 128) * 1e-5, base32=W)  # far below the grid step
    text = format_table(q.report())
    assert sum(line.endswith(" erased") for line in text.splitlines()) == 3
    assert "total: 3 tensors" in text and "warning: re-quantizing erased" in text


def test_int8_refuses_values_beyond_fp16():
    from loraport.errors import BadInputError

    q = get_quantizer("int8")
    q.entries("a.weight", (2, 2))
    with pytest.raises(BadInputError, match="65504"):
        q.quantize("a.weight", torch.tensor([[1e5, 0.0], [0.0, 1.0]]))
