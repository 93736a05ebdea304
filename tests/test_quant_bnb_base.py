"""A bitsandbytes-quantized base (saved by transformers itself) as loraport's --base: the dequantized view,
the 16-bit round trip, --fp16-base, and damaged folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError
from loraport.merging import merge
from loraport.quant.bnb_checkpoint import BnbCheckpoint, is_bnb_folder, open_quantized_base
from loraport.safetensors_io import SafetensorsFile, save_file
from tests._quant_util import BF16, GPT2_NF4, INT8, LORA, NF4_DQ, bnb_dequantized_state, quiet_model


@pytest.mark.parametrize("folder", [NF4_DQ, INT8])
def test_logical_view_equals_bitsandbytes_dequantization(folder):
    ck = BnbCheckpoint.open(folder)
    ref = bnb_dequantized_state(quiet_model(folder, device_map="cpu"))
    plain = SafetensorsFile(BF16 / "model.safetensors")
    assert sorted(ck.names()) == sorted(plain.names())  # aux tensors hidden, logical names only
    assert "quantization_config" not in ck.config
    for n in ck.names():
        info = ck.info(n)
        assert tuple(info.shape) == tuple(plain.tensors[n].shape), n
        got = ck.get(n)
        assert got.dtype == info.dtype == torch.bfloat16, n
        assert torch.equal(got, ref[n].to(got.dtype)), n
    assert ck.quant["quantized_tensors"] == 7


def test_gpt2_conv1d_weights_served_in_model_orientation():
    ck = BnbCheckpoint.open(GPT2_NF4)
    from transformers import GPT2Config, GPT2LMHeadModel

    shapes = {k: tuple(v.shape) for k, v in GPT2LMHeadModel(GPT2Config(**{
        k: v for k, v in ck.config.items() if k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    })).state_dict().items()}
    ref = bnb_dequantized_state(quiet_model(GPT2_NF4, device_map="cpu"))
    name = "transformer.h.0.attn.c_attn.weight"
    assert tuple(ck.info(name).shape) == shapes[name] == (64, 192)
    assert ck.layer_hint(name) == "conv1d"
    assert torch.equal(ck.get(name), ref[name].t().to(torch.bfloat16))  # bnb stores Linear orientation


def test_bnb_base_to_16bit_equals_merging_into_dequantized_weights(tmp_path):
    """Round trip: transformers-saved nf4 base → loraport merge → 16-bit; reference: PEFT merge_and_unload on
    an fp32 model holding bitsandbytes' dequantized weights, rounded to the same dtype."""
    from peft import PeftModel

    out = tmp_path / "merged"
    rep = merge(NF4_DQ, [LORA], out)
    assert rep["tensors_updated"] == 7
    m = quiet_model(BF16, dtype=torch.float32)
    m.load_state_dict({k: v.float() for k, v in bnb_dequantized_state(quiet_model(NF4_DQ, device_map="cpu")).items()})
    ref = PeftModel.from_pretrained(m, LORA).merge_and_unload().state_dict()
    got = SafetensorsFile(out / "model.safetensors")
    assert sorted(got.names()) == sorted(ref)
    for k, v in ref.items():
        g = got.get(k)
        assert g.dtype == torch.bfloat16
        assert torch.equal(g, v.to(torch.bfloat16)), k


def test_bnb_base_to_16bit_config_has_no_quantization_config(tmp_path):
    out = tmp_path / "merged"
    merge(NF4_DQ, [LORA], out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = quiet_model(out, device_map="cpu")  # a plain 16-bit model again
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_requantizing_a_quantized_base_erases_the_adapter_and_fp16_base_keeps_it(tmp_path):
    opts = {"double_quant": True}
    bad = merge(NF4_DQ, [LORA], tmp_path / "a", quantize="nf4", quant_options=opts)["quantization"]
    good = merge(NF4_DQ, [LORA], tmp_path / "b", quantize="nf4", quant_options=opts, fp16_base=BF16)["quantization"]
    tb, tg = bad[-1], good[-1]
    assert tb["name"] == tg["name"] == "(total)" and tb["updated_tensors"] == tg["updated_tensors"] == 7
    assert tb["delta_retained_median"] < 0.3 and "erased most of the adapter" in tb["warning"]
    assert tg["delta_retained_median"] > 0.8 and "warning" not in tg
    for r in bad[:-1]:
        assert r["erased"] and r["codes_changed"] < 0.05
        assert 0 <= r["rel_error"] < 0.2 and r["snr_db"] > 10 and r["bytes_after"] < r["bytes_before"]


def test_fp16_base_must_match(tmp_path):
    with pytest.raises(BadInputError, match="quantized"):
        open_quantized_base(Checkpoint.open(NF4_DQ), fp16_base=INT8)
    other = tmp_path / "other"
    shutil.copytree(BF16, other)
    t = SafetensorsFile(BF16 / "model.safetensors").load_all()
    t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :64].contiguous()
    (other / "model.safetensors").unlink()
    save_file(t, other / "model.safetensors", {"format": "pt"})
    with pytest.raises(BadInputError, match="down_proj"):
        open_quantized_base(Checkpoint.open(NF4_DQ), fp16_base=other)


def test_is_bnb_folder():
    assert is_bnb_folder(NF4_DQ) and is_bnb_folder(INT8) and is_bnb_folder(GPT2_NF4)
    assert not is_bnb_folder(BF16) and not is_bnb_folder(LORA)


def _damaged(tmp_path, src, edit):
    d = tmp_path / "bad"
    shutil.copytree(src, d)
    t = SafetensorsFile(src / "model.safetensors").load_all()
    edit(t)
    (d / "model.safetensors").unlink()
    save_file(t, d / "model.safetensors", {"format": "pt"})
    return d


W = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("src,edit,match", [
    (NF4_DQ, lambda t: t.__setitem__(W + ".absmax", t[W + ".absmax"][:-1].clone()), "absmax"),
    (NF4_DQ, lambda t: t.pop(W + ".nested_absmax"), "double-quantization"),
    (NF4_DQ, lambda t: t.__setitem__(W + ".quant_state.bitsandbytes__nf4", torch.tensor(list(b"{not json"),
                                                                                      dtype=torch.uint8)), "JSON"),
    (NF4_DQ, lambda t: t.__setitem__(W, t[W][:-3].clone()), "packed codes"),
    (INT8, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight_format", torch.tensor(1, dtype=torch.uint8)),
     "GPU-tiled"),
    (INT8, lambda t: t.__setitem__("model.layers.0.mlp.down_proj.SCB", torch.ones(3)), "SCB"),
])
def test_damaged_quantized_base_is_a_clear_error(tmp_path, src, edit, match):
    d = _damaged(tmp_path, src, edit)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(BadInputError, match=match):
        merge(d, [LORA], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_fp16_base_needs_a_quantized_base():
    with pytest.raises(BadInputError, match="only meaningful"):
        open_quantized_base(Checkpoint.open(BF16), fp16_base=BF16)


def test_fp4_with_bf16_quant_storage_reads_like_bitsandbytes(tmp_path):
    """bnb_4bit_quant_storage=bfloat16 stores the same packed bytes viewed as bf16 (FSDP-QLoRA setups)."""
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_quant_storage=torch.bfloat16,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    quiet_model(BF16, quantization_config=qc, device_map="cpu", dtype=torch.bfloat16).save_pretrained(tmp_path)
    ck = BnbCheckpoint.open(tmp_path)
    assert SafetensorsFile(tmp_path / "model.safetensors").tensors[W].dtype == torch.bfloat16
    ref = bnb_dequantized_state(quiet_model(tmp_path, device_map="cpu"))
    assert ck.quant["quant_type"] == "fp4" and not ck.quant["double_quant"]
    for n in ck.names():
        assert torch.equal(ck.get(n), ref[n].to(ck.info(n).dtype)), n
