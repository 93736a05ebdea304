"""The remaining fp8 layouts of issue #19: compressed-tensors `group` and `block` strategies (codes and scales
equal compressed-tensors' own calculate_qparams + quantize) and DeepSeek-V3.1's power-of-two `ue8m0` block
scales (DeepGEMM's per_block_cast_to_fp8(use_ue8m0=True), restated below: DeepGEMM needs CUDA; the rounding
equals transformers' own `_ceil_to_ue8m0`). A merge writes the same layout back and loads in transformers where
the base did; damaged configs and scales are one line, exit 2. ~6 s of CPU on the committed tiny Llama."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraport.formats import load_adapter
from loraport.merging import build_plan, merge, merged_tensor, open_base
from loraport.quant import fp8 as F
from tests._peft_util import cli
from tests._quant_util import BF16, LORA

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3 = torch.float8_e4m3fn


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _weights(shape=(96, 160), dtype=torch.float32) -> torch.Tensor:
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    W[:32, :32] = 0  # an all-zero tile / group
    W[40, 7] = 3.0  # an outlier
    return W.to(dtype)


# --- producers --------------------------------------------------------------------------------------------
def ct_tiles(W: torch.Tensor, strategy: str, tile: tuple[int, int]):
    """compressed-tensors' symmetric fp8 quantization of W (held in its own dtype) with a min/max per group or
    per block (what llm-compressor's minmax observer feeds calculate_qparams)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    if strategy == "group":
        args = QuantizationArgs(num_bits=8, type="float", strategy="group", group_size=tile[1], symmetric=True)
        v = W.unflatten(-1, (W.shape[1] // tile[1], tile[1]))
        lo, hi = v.amin(-1), v.amax(-1)
    else:
        args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=list(tile),
                                symmetric=True)
        rows, cols = W.shape
        gr, gc = -(-rows // tile[0]), -(-cols // tile[1])
        v = torch.nn.functional.pad(W, (0, gc * tile[1] - cols, 0, gr * tile[0] - rows))
        v = v.reshape(gr, tile[0], gc, tile[1])
        lo, hi = v.amin(dim=(1, 3)), v.amax(dim=(1, 3))
    scale, zp = calculate_qparams(lo, hi, args)
    return quantize(W, scale, zp, args, dtype=E4M3).contiguous(), scale


def deepgemm_ue8m0(W: torch.Tensor, block=(128, 128)):
    """DeepGEMM's per_block_cast_to_fp8(use_ue8m0=True) as its source reads: pad to whole blocks, amax per block
    (float, clamped to 1e-4), sf = 2^ceil(log2(amax / 448)), q = (x · (1/sf)) cast to e4m3."""
    rows, cols = W.shape
    gr, gc = -(-rows // block[0]), -(-cols // block[1])
    x = torch.zeros(gr * block[0], gc * block[1], dtype=W.dtype)
    x[:rows, :cols] = W
    v = x.view(gr, block[0], gc, block[1])
    amax = v.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    sf = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = (v * (1.0 / sf)).to(E4M3)
    return q.view_as(x)[:rows, :cols].contiguous(), sf.view(gr, gc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("strategy,tile", [("group", (1, 32)), ("block", (64, 64)), ("block", (32, 48))])
def test_compressed_tensors_group_and_block_codes_and_scales(strategy, tile, dtype):
    W = _weights(dtype=dtype)
    ref_q, ref_s = ct_tiles(W, strategy, tile)
    q, s = F.quantize_ct_tiles(W.float(), tile, dtype)
    assert s.dtype == ref_s.dtype == dtype and torch.equal(s, ref_s)
    assert torch.equal(_bits(q), _bits(ref_q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ue8m0_block_codes_and_scales_equal_deepgemms_rule(dtype):
    from transformers.integrations.deepgemm import _ceil_to_ue8m0

    W = _weights(dtype=dtype)
    ref_q, ref_s = deepgemm_ue8m0(W, (32, 32))
    q, s = F.quantize_block_ue8m0(W.float(), (32, 32))
    assert torch.equal(s, ref_s) and torch.equal(_bits(q), _bits(ref_q))
    amax = torch.rand(4000, generator=torch.Generator().manual_seed(1)) * 10.0 ** torch.randint(-3, 4, (4000,))
    assert torch.equal(F.ceil_pow2(amax), _ceil_to_ue8m0(amax.clone()))  # transformers' own rounding
    assert torch.equal(F.e8m0_float(F.e8m0_bytes(s)), s)  # the byte form round-trips
    assert float(s[0, 0]) == 2.0 ** -22  # an all-zero block: amax clamped to 1e-4, 1e-4/448 → 2^-22


# --- bases ------------------------------------------------------------------------------------------------
def _linear(k: str) -> bool:
    return k.endswith(".weight") and any(f".{m}." in k for m in LINEARS)


def ct_tiled_base(dst, strategy: str, tile: tuple[int, int]):
    """llm-compressor's layout for FP8 group / block weight schemes, every Linear, scales in bf16."""
    shutil.copytree(BF16, dst)
    sd, cfg = load_file(dst / "model.safetensors"), json.loads((dst / "config.json").read_text())
    out = {}
    for k, v in sd.items():
        if _linear(k):
            out[k], out[k[: -len("weight")] + "weight_scale"] = ct_tiles(v, strategy, tile)
        else:
            out[k] = v
    w = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "observer": "minmax",
         "strategy": strategy, **({"group_size": tile[1]} if strategy == "group" else {"block_structure": list(tile)})}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": None,
                                      "format": "float-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None}
    save_file(out, dst / "model.safetensors", {"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def ue8m0_base(dst, as_bytes: bool):
    """DeepSeek-V3.1's layout: FineGrainedFP8 blocks with scale_fmt "ue8m0" (fp32 powers of two, or the UE8M0
    bytes MXFP8-style checkpoints store)."""
    shutil.copytree(BF16, dst)
    sd, cfg = load_file(dst / "model.safetensors"), json.loads((dst / "config.json").read_text())
    out = {}
    for k, v in sd.items():
        if _linear(k):
            q, sf = deepgemm_ue8m0(v, (32, 32))
            out[k], out[k[: -len("weight")] + "weight_scale_inv"] = q, F.e8m0_bytes(sf) if as_bytes else sf
        else:
            out[k] = v
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "scale_fmt": "ue8m0", "weight_block_size": [32, 32]}
    save_file(out, dst / "model.safetensors", {"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _expected(base_dir, name: str) -> torch.Tensor:
    ck = open_base(base_dir)
    try:
        return merged_tensor(build_plan(ck, [(load_adapter(LORA, base=ck), 1.0)]), name)
    finally:
        ck.close()


NAME = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("strategy,tile", [("group", (1, 32)), ("block", (32, 48))])
def test_compressed_tensors_group_and_block_bases_round_trip(tmp_path, strategy, tile):
    base = ct_tiled_base(tmp_path / "base", strategy, tile)
    out = tmp_path / "out"
    rep = merge(base, [LORA], out)
    sb, so = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in sb.items()} == {k: (v.dtype, v.shape) for k, v in so.items()}
    ref_q, ref_s = ct_tiles(_expected(base, NAME).to(torch.bfloat16), strategy, tile)
    assert torch.equal(_bits(so[NAME]), _bits(ref_q))
    assert torch.equal(so[NAME[: -len("weight")] + "weight_scale"], ref_s)
    assert not torch.equal(_bits(so[NAME]), _bits(sb[NAME]))
    row = next(r for r in rep["quantization"] if r["name"] == NAME)
    assert row["layout"] == f"{'group' if strategy == 'group' else 'ct-block'} float8_e4m3fn"
    assert 0 < row["delta_retained"] <= 1.5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == strategy
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # through compressed-tensors, as the base loads
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("as_bytes", [False, True])
def test_ue8m0_block_base_round_trip(tmp_path, as_bytes):
    base = ue8m0_base(tmp_path / "base", as_bytes)
    out = tmp_path / "out"
    merge(base, [LORA], out)
    sb, so = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in sb.items()} == {k: (v.dtype, v.shape) for k, v in so.items()}
    ref_q, ref_s = deepgemm_ue8m0(_expected(base, NAME), (32, 32))
    sname = NAME[: -len("weight")] + "weight_scale_inv"
    assert torch.equal(_bits(so[NAME]), _bits(ref_q))
    assert torch.equal(so[sname], F.e8m0_bytes(ref_s) if as_bytes else ref_s)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(out).state_dict()[NAME]  # CPU: dequantized by transformers
    assert torch.equal(got, F.dequantize_block(so[NAME], ref_s, (32, 32)).to(got.dtype))


# --- bad input --------------------------------------------------------------------------------------------
def _refused(tmp_path, base) -> str:
    out = tmp_path / "never"
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    res = cli("merge", "--base", base, "--adapter", LORA, "--out", out)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not out.exists()
    assert before == {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    return res.output


def test_group_without_group_size_and_a_scale_off_the_grid_are_refused(tmp_path):
    base = ct_tiled_base(tmp_path / "g", "group", (1, 32))
    cfg = json.loads((base / "config.json").read_text())
    del cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"]
    (base / "config.json").write_text(json.dumps(cfg))
    assert "group_size" in _refused(tmp_path, base)
    base = ct_tiled_base(tmp_path / "b", "block", (32, 48))
    sd = load_file(base / "model.safetensors")
    sd[NAME[: -len("weight")] + "weight_scale"] = sd[NAME[: -len("weight")] + "weight_scale"][:, :1].clone()
    save_file(sd, base / "model.safetensors")
    assert "ct-block [2, 3]" in _refused(tmp_path, base)


def test_uint8_scale_outside_a_block_layout_is_refused(tmp_path):
    base = ct_tiled_base(tmp_path / "g", "group", (1, 32))
    sd = load_file(base / "model.safetensors")
    s = NAME[: -len("weight")] + "weight_scale"
    sd[s] = torch.zeros(sd[s].shape, dtype=torch.uint8)
    save_file(sd, base / "model.safetensors")
    assert "expected a float dtype" in _refused(tmp_path, base)


# --- per-expert fp8 MoE bases (Qwen3-MoE-FP8 naming) --------------------------------------------------------
def test_target_parameters_adapter_merges_into_a_per_expert_fp8_moe_base(tmp_path):
    """Qwen3-MoE-FP8 stores each expert's Linear as its own block-scaled fp8 weight
    (`mlp.experts.N.up_proj.weight` + `weight_scale_inv`); PEFT's target_parameters LoRA is on the fused
    in-memory parameter. Reference: PEFT's merge_and_unload on the model transformers builds from the
    dequantized weights; loraport's fp32 output matches it (≤1e-5), its default output holds transformers'
    block codes of that fp32 merge (the same rule as test_fp8.py's block tests)."""
    import transformers as tf
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = tf.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[])
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "plain")
    get_peft_model(model, LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).save_pretrained(tmp_path / "adapter")
    (tmp_path / "fp8").mkdir()
    (tmp_path / "deq").mkdir()
    fp8, deq = {}, {}
    for k, v in load_file(tmp_path / "plain" / "model.safetensors").items():
        if k.endswith("proj.weight"):
            q, s = F.quantize_block(v.float(), (16, 16))
            fp8[k], fp8[k[: -len("weight")] + "weight_scale_inv"] = q, s
            deq[k] = F.dequantize_block(q, s, (16, 16))
        else:
            fp8[k], deq[k] = v, v.float()
    save_file(fp8, tmp_path / "fp8" / "model.safetensors", {"format": "pt"})
    save_file(deq, tmp_path / "deq" / "model.safetensors", {"format": "pt"})
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    (tmp_path / "deq" / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [16, 16]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    ref_model = tf.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32)
    PeftModel.from_pretrained(ref_model, tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "ref")
    ref = load_file(tmp_path / "ref" / "model.safetensors")

    merge(tmp_path / "fp8", [tmp_path / "adapter"], tmp_path / "o32", dtype="fp32")
    o32 = load_file(tmp_path / "o32" / "model.safetensors")
    assert set(o32) == set(ref) and max(float((o32[k] - ref[k]).abs().max()) for k in ref) <= 1e-5
    rep = merge(tmp_path / "fp8", [tmp_path / "adapter"], tmp_path / "o8")
    o8 = load_file(tmp_path / "o8" / "model.safetensors")
    experts = [k for k in ref if ".experts." in k]
    assert len(experts) == 12 and len([r for r in rep["quantization"] if r["name"] != "(total)"]) == 12
    for k in experts:
        q, s = F.quantize_block(o32[k], (16, 16))
        assert torch.equal(_bits(o8[k]), _bits(q)) and torch.equal(o8[k[: -len("weight")] + "weight_scale_inv"], s)
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale_inv"):
        assert torch.equal(_bits(o8[k]), _bits(fp8[k]))  # untouched: copied
