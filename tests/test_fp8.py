"""fp8 bases and outputs (issue #19): codes and scales equal what each producer computes, a merge into an fp8
base writes the same layout back (loaded by transformers where it loaded before), --dtype writes 16-bit
instead, --quantize fp8 writes the consumers' layouts, and damaged fp8 bases are one clear line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraport.checkpoint import Checkpoint
from loraport.formats import load_adapter
from loraport.merging import build_plan, merge, merged_tensor, open_base
from loraport.quant import fp8 as F
from tests._fp8_util import block_base, comfy_file, comfy_scaled, ct_base, ct_quantize, hf_fp8_quantizer
from tests._peft_util import cli
from tests._quant_util import BF16, LORA

E4M3 = torch.float8_e4m3fn


def _weights(shape=(96, 160), seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * 0.05
    W[:32, :32] = 0  # an all-zero tile / row
    W[40, 7] = 3.0  # an outlier: sets its tile's / row's / the tensor's scale
    return W.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


# --- codecs against the producers -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 160), (128, 256)])
def test_block_codes_equal_transformers_finegrained_fp8(shape):
    W = _weights(shape)
    ref = hf_fp8_quantizer((32, 32))._quantize_one("m.weight", W)
    q, s = F.quantize_block(W, (32, 32))
    assert torch.equal(_bits(q), _bits(ref["m.weight"]))
    assert torch.equal(s, ref["m.weight_scale_inv"])
    assert float(s[0, 0]) == 1.0  # zero tile: scale 1, codes 0
    back = F.dequantize_block(q, s, (32, 32))
    assert float((back - W).abs().max()) <= float(s.max()) * 16  # within half a step of e4m3 at its top


def test_block_partial_edge_tiles_have_their_own_scale():
    W = _weights((100, 70))
    q, s = F.quantize_block(W, (32, 32))
    assert tuple(s.shape) == (4, 3)
    edge = W[96:, 64:]
    assert float(s[3, 2]) == pytest.approx(float(edge.abs().amax()) / 448, rel=1e-6)
    assert torch.allclose(F.dequantize_block(q, s, (32, 32)), W, rtol=0.07, atol=1e-6)


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compressed_tensors_codes_and_scales(strategy, dtype):
    W = _weights(dtype=dtype)
    ref_q, ref_s = ct_quantize(W, strategy)
    q, s = F.quantize_ct(W.float(), strategy, dtype)
    assert s.dtype == ref_s.dtype == dtype
    assert torch.equal(s, ref_s)
    assert torch.equal(_bits(q), _bits(ref_q))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_and_scaled_casts_are_torchs_rounding_saturated(dtype):
    m = torch.finfo(dtype).max
    W = torch.tensor([0.1, -0.3, m * 2, -m * 3, 1e-9])
    q = F.quantize_plain(W, dtype)
    assert torch.equal(_bits(q[:2]), _bits(W[:2].to(dtype)))  # in range: exactly torch's own cast
    assert q[2:4].float().tolist() == [m, -m]  # beyond: saturated (torch's own e5m2 cast gives inf)
    W = _weights()
    q, s = F.quantize_scaled(W, dtype)
    rq, rs = comfy_scaled(W, dtype)
    assert torch.equal(_bits(q), _bits(rq)) and torch.equal(s, rs)


@pytest.mark.parametrize("kind", ["block", "channel", "tensor", "scaled"])
def test_report_sample_rows_decode_like_the_whole_tensor(kind):
    from loraport.quant.fp8_quantizer import Fp8Quantizer
    from loraport.quant.fp8_spec import Fp8Spec

    W = _weights((300, 256))
    spec = Fp8Spec(kind, "m.weight", E4M3, tuple(W.shape), scale_dtype=torch.bfloat16 if kind in
                   ("channel", "tensor") else torch.float32, scale_shape=(300, 1) if kind == "channel" else (),
                   block=(128, 128) if kind == "block" else None)
    codes, scale, _ = Fp8Quantizer._encode(spec, W)
    rows = Fp8Quantizer()._sample(spec, tuple(W.shape))
    assert rows is not None and rows.numel() < 300
    if kind == "block":  # whole 128-row bands
        assert set(rows.tolist()) <= set(range(300)) and rows.numel() % 128 in (0, 300 % 128)
    full = Fp8Quantizer._decode(codes, scale, spec)
    assert torch.equal(Fp8Quantizer._decode(codes, scale, spec, rows), full.index_select(0, rows))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("sdt", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_cast_needs_no_clamp(dtype, sdt):
    """The top value of a tensor divided by its amax-derived scale, rounded in the scale's dtype, casts to
    ±max with or without the producers' clamp (cast_scaled skips it)."""
    g = torch.Generator().manual_seed(1)
    amax = (torch.rand(5000, generator=g) * 10.0 ** torch.randint(-6, 4, (5000,), generator=g)).to(sdt)
    m = torch.tensor(torch.finfo(dtype).max, dtype=sdt)
    scale = amax / m
    amax, scale = amax[scale > 0], scale[scale > 0]
    normal = scale >= torch.finfo(sdt).tiny
    for keep in (normal, ~normal):  # normal scales: no clamp needed; subnormal ones (fp16): clamped
        x, s = torch.cat([amax[keep], -amax[keep]]) / torch.cat([scale[keep], scale[keep]]), scale[keep]
        assert torch.equal(_bits(F.cast_scaled(x, dtype, s)), _bits(F.cast(x, dtype)))
        assert not torch.isinf(F.cast_scaled(x, dtype, s).float()).any()


# --- merging into fp8 bases ----------------------------------------------------------------------------------
def _expected(base_dir, name: str) -> torch.Tensor:
    """loraport's fp32 merge of lora-small for `name` (the sink's input)."""
    ck = open_base(base_dir)
    try:
        plan = build_plan(ck, [(load_adapter(LORA, base=ck), 1.0)])
        return merged_tensor(plan, name)
    finally:
        ck.close()


def test_block_base_merge_writes_the_same_layout(tmp_path):
    base = block_base(tmp_path / "base")
    out = tmp_path / "out"
    rep = merge(base, [LORA], out)
    before, after = _meta(base / "model.safetensors"), _meta(out / "model.safetensors")
    assert before == after  # same keys, dtypes and shapes
    sb, so = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    for k in ("lm_head.weight", "lm_head.weight_scale_inv", "model.norm.weight"):  # untouched: byte-identical
        assert torch.equal(_bits(sb[k]), _bits(so[k])), k
    name = "model.layers.0.mlp.down_proj.weight"
    ref = hf_fp8_quantizer((32, 32))._quantize_one(name, _expected(base, name))  # transformers' own rule
    assert torch.equal(_bits(so[name]), _bits(ref[name]))
    assert torch.equal(so[name.replace("weight", "weight_scale_inv")], ref[name + "_scale_inv"]
                       if name + "_scale_inv" in ref else ref[name[:-len("weight")] + "weight_scale_inv"])
    assert not torch.equal(_bits(so[name]), _bits(sb[name]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [32, 32]
    rows = {r["name"]: r for r in rep["quantization"]}
    assert rows[name]["layout"] == "block float8_e4m3fn" and 0 < rows[name]["delta_retained"] <= 1.5
    assert "lm_head.weight" not in rows  # untouched weights are copied, not re-quantized
    merge(base, [LORA], tmp_path / "again", quantize="fp8")  # --quantize fp8 on an fp8 base: its own layout
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(_bits(again[k]), _bits(so[k])) for k in so)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # CPU: transformers dequantizes the fp8 blocks to bf16
    got = model.state_dict()[name]
    want = F.dequantize_block(so[name], so[name[:-len("weight")] + "weight_scale_inv"], (32, 32))
    assert torch.equal(got, want.to(got.dtype))


def test_block_base_dtype_bf16_writes_16bit(tmp_path):
    base = block_base(tmp_path / "base")
    out = tmp_path / "out16"
    assert cli("merge", "--base", base, "--adapter", LORA, "--out", out, "--dtype", "bf16").exit_code == 0
    meta = _meta(out / "model.safetensors")
    assert set(meta) == set(_meta(BF16 / "model.safetensors"))  # scales gone, names as the 16-bit model's
    assert {d for d, _ in meta.values()} == {"BF16"}
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(load_file(out / "model.safetensors")[name], _expected(base, name).to(torch.bfloat16))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_compressed_tensors_base_round_trip(tmp_path):
    base = ct_base(tmp_path / "base")
    out = tmp_path / "out"
    merge(base, [LORA], out)
    assert _meta(base / "model.safetensors") == _meta(out / "model.safetensors")
    so = load_file(out / "model.safetensors")
    for name, strategy in (("model.layers.0.self_attn.k_proj.weight", "tensor"),
                           ("model.layers.0.mlp.up_proj.weight", "channel")):
        ref_q, ref_s = ct_quantize(_expected(base, name).to(torch.bfloat16), strategy)
        assert torch.equal(_bits(so[name]), _bits(ref_q)), name
        assert torch.equal(so[name[:-len("weight")] + "weight_scale"], ref_s), name
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # through compressed-tensors, the fp8 weights kept
    sd = model.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(_bits(sd[name]), _bits(so[name]))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("scaled,dtype", [(True, torch.float8_e4m3fn), (False, torch.float8_e5m2)])
def test_comfy_single_file_keeps_keys_dtypes_and_marker(tmp_path, scaled, dtype):
    base = comfy_file(tmp_path / "base.safetensors", scaled=scaled, dtype=dtype)
    out = tmp_path / "out.safetensors"
    merge(base, [LORA], out)
    assert _meta(base) == _meta(out)
    sb, so = load_file(base), load_file(out)
    name = "model.layers.0.self_attn.o_proj.weight"
    W = _expected(base, name)
    if scaled:
        q, s = comfy_scaled(W, dtype)
        assert torch.equal(so[name.replace("weight", "scale_weight")], s)
        assert torch.equal(so["model.layers.0.self_attn.q_proj.scale_input"],
                           sb["model.layers.0.self_attn.q_proj.scale_input"])
    else:
        q = W.clamp(-57344, 57344).to(dtype)
    assert torch.equal(_bits(so[name]), _bits(q))


def test_quantize_fp8_from_16bit_folder_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "b16")
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "b16"),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    out = tmp_path / "fp8"
    res = cli("merge", "--base", tmp_path / "b16", "--adapter", tmp_path / "lora", "--out", out, "--quantize", "fp8")
    assert res.exit_code == 0, res.output
    meta = _meta(out / "model.safetensors")
    assert meta["model.layers.0.self_attn.q_proj.weight"] == ("F8_E4M3", (128, 128))
    assert meta["model.layers.0.self_attn.q_proj.weight_scale_inv"] == ("F32", (1, 1))
    assert meta["lm_head.weight"][0] == "BF16"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128] and "lm_head" in \
        qc["modules_to_not_convert"]
    so = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    ck = Checkpoint.open(tmp_path / "b16")
    plan = build_plan(ck, [(load_adapter(tmp_path / "lora", base=ck), 1.0)])
    ref = hf_fp8_quantizer((128, 128))._quantize_one(name, merged_tensor(plan, name))
    assert torch.equal(_bits(so[name]), _bits(ref[name]))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# --- bad input -------------------------------------------------------------------------------------------------
def _refused(tmp_path, base, *extra) -> str:
    out = tmp_path / "never"
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} if base.is_dir() else {}
    res = cli("merge", "--base", base, "--adapter", LORA, "--out", out, *extra)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not out.exists()
    assert before == ({p: p.read_bytes() for p in base.rglob("*") if p.is_file()} if base.is_dir() else {})
    return res.output


def test_unknown_quant_method_is_one_line(tmp_path):
    import shutil

    base = tmp_path / "awq"
    shutil.copytree(BF16, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (base / "config.json").write_text(json.dumps(cfg))
    assert "quant_method 'awq'" in _refused(tmp_path, base)


def test_inconsistent_block_scale_is_refused(tmp_path):
    base = block_base(tmp_path / "base")
    sd = load_file(base / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(sd, base / "model.safetensors")
    assert "does not match weight" in _refused(tmp_path, base)


def test_scale_without_fp8_weight_and_unsupported_ct_strategy(tmp_path):
    base = comfy_file(tmp_path / "a" / "base.safetensors")
    sd = load_file(base)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].float()
    save_file(sd, base)
    assert "without an fp8 weight" in _refused(tmp_path, base)
    ct = block_base(tmp_path / "ct")
    cfg = json.loads((ct / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (ct / "config.json").write_text(json.dumps(cfg))
    assert "pack-quantized" in _refused(tmp_path, ct)


def test_inspect_shows_base_storage(tmp_path):
    base = block_base(tmp_path / "base")
    res = cli("inspect", LORA, "--base", base, "--json")
    assert res.exit_code == 0, res.output
    b = json.loads(res.output)["base"]
    assert b["families"]["model.layers.*.mlp.up_proj.weight"] == "float8_e4m3fn + float32 32x32 block scales"
    assert b["families"]["model.norm.weight"] == "bfloat16"
    assert "same layout" in b["merge_writes"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_into_fp8_base_equals_cpu(tmp_path):
    base = block_base(tmp_path / "base")
    merge(base, [LORA], tmp_path / "cpu", device="cpu")
    merge(base, [LORA], tmp_path / "gpu", device="cuda")
    a, b = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the same rule on both devices; the fp32 merge may differ in the last bit (GEMM order), which
        # can move a value across a rounding midpoint: a code or two, never a scale beyond fp32 rounding
        if a[k].dtype == E4M3:
            assert float((_bits(a[k]) != _bits(b[k])).float().mean()) <= 1e-3, k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-6, atol=0), k
