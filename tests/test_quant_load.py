"""loraport merge --quantize nf4 | fp4 | int8 writes folders that transformers + bitsandbytes load on CPU with a
plain from_pretrained, and whose logits are those of the merged model up to the quantization error.

Bounds (measured on the fixture, tiny Llama + small LoRA, bf16 compute):
* loaded model vs an fp32 model holding our dequantized weights: max-abs ≤ 0.02 for 4-bit (bf16 compute noise,
  measured ≈ 0.005) and ≤ 0.05 for int8 (LLM.int8 also quantizes activations; measured ≈ 0.02);
* loaded model vs the fp32 merged model: within the weight-quantization error itself (the fp32 model with our
  dequantized weights) plus that compute noise.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from loraport.merging import merge
from loraport.quant.bnb_checkpoint import BnbCheckpoint
from tests._quant_util import BF16, LORA, logits, quiet_model

COMPUTE_TOL = {"nf4": 0.02, "fp4": 0.02, "int8": 0.05}
LAYER = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def ref_logits():
    from peft import PeftModel

    m = PeftModel.from_pretrained(quiet_model(BF16, dtype=torch.float32), LORA).merge_and_unload()
    return logits(m)


@pytest.mark.parametrize("q,opts", [("nf4", {"double_quant": True}), ("fp4", {}), ("int8", {})])
def test_transformers_loads_our_quantized_merge(tmp_path, ref_logits, q, opts):
    out = tmp_path / q
    rep = merge(BF16, [LORA], out, quantize=q, quant_options=opts)
    rows = rep["quantization"]
    assert len(rows) == 8 and rows[-1]["name"] == "(total)" and rows[-1]["erased_tensors"] == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["llm_int8_skip_modules"] == ["lm_head", "model.embed_tokens"]

    model = quiet_model(out, device_map="cpu")  # no extra arguments
    layer = model.model.layers[0]
    assert type(layer.mlp.down_proj).__name__ == LAYER[q] and type(model.lm_head).__name__ == "Linear"
    got = logits(model)

    sim = quiet_model(BF16, dtype=torch.float32)
    ck = BnbCheckpoint.open(out)
    sim.load_state_dict({n: ck.get32(n) for n in ck.names()})
    sim_logits = logits(sim)
    compute_err = (got - sim_logits).abs().max().item()
    quant_err = (sim_logits - ref_logits).abs().max().item()
    total_err = (got - ref_logits).abs().max().item()
    assert compute_err <= COMPUTE_TOL[q], compute_err
    assert total_err <= quant_err + COMPUTE_TOL[q], (total_err, quant_err)
    assert quant_err > 0  # the weights really are quantized


def test_cli_merge_quantize_json_has_the_report(tmp_path):
    from loraport.cli import main

    res = CliRunner().invoke(main, ["merge", "--base", str(BF16), "--adapter", str(LORA), "--out",
                                    str(tmp_path / "o"), "--quantize", "nf4", "--double-quant", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout[res.stdout.index("{"):])
    rows = rep["quantization"]
    keys = {"name", "shape", "bytes_before", "bytes_after", "rel_error", "snr_db", "delta_survival",
            "delta_retained", "codes_changed"}
    assert all(keys <= set(r) for r in rows[:-1])
    assert 0.05 < rows[0]["rel_error"] < 0.15 and rows[-1]["delta_retained_median"] > 0.8


def test_gpt2_conv1d_stays_16bit_declared_and_loads(tmp_path):
    """GPT-2's Conv1D weights are left unquantized and listed in llm_int8_skip_modules: transformers keeps
    them as Conv1D and the model runs."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=1, n_head=4, bos_token_id=0,
                               eos_token_id=0)).to(torch.bfloat16).save_pretrained(base)
    pm = get_peft_model(quiet_model(base, dtype=torch.float32),
                        LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    ref = logits(pm.merge_and_unload())
    out = tmp_path / "q"
    merge(base, [tmp_path / "lora"], out, quantize="nf4")
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "transformer.h.0.attn.c_attn" in skip and "lm_head" in skip
    model = quiet_model(out, device_map="cpu")
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    got = logits(model)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
