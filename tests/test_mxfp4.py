"""MXFP4 gpt-oss bases (issue #19): the codec matches transformers' dequantizer and the rounding rule of the
quantizer transformers calls (triton_kernels' downcast_to_mxfp_torch, restated bit by bit below: triton does
not install on this CPU machine); a merge into an MXFP4 base equals PEFT's merge_and_unload on the model
transformers dequantizes (≤1e-5 in fp32), writes MXFP4 back with the codes our quantizer gives PEFT's merged
weights, reports how much of the delta survived, and loads in transformers; --dtype bf16 / --quantize mxfp4;
damaged bases are one line, exit 2, nothing written. ~10 s of CPU (a tiny gpt-oss built with transformers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraport
from loraport.errors import BadInputError
from loraport.quant import mxfp4 as M
from tests._hostile_layouts import edit_folder
from tests._peft_util import cli

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
X = torch.tensor([[3, 17, 42, 5, 9, 60, 1]])
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


# --- the codec ----------------------------------------------------------------------------------------------
def _bitwise_reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent statement of triton_kernels' mxfp4 downcast (ROUND_UP scale), written on the fp32 bit
    patterns the way that kernel works (keep two mantissa bits, add one at the round bit), for rows [n, 32·G]."""
    x = rows.to(torch.bfloat16).to(torch.float32)
    n, cols = x.shape
    g = x.reshape(n, cols // 32, 32)
    d = (g.abs().amax(-1, keepdim=True) / 6.0).contiguous()
    dbits = (d.view(torch.int32).to(torch.int64) + 0x7FFFFF) & 0x7F800000
    dr = dbits.to(torch.int32).view(torch.float32)
    q = (g * torch.where(dr == 0, torch.zeros_like(dr), 1.0 / dr)).reshape(n, cols).contiguous()
    b = q.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign, exp, man = b >> 31, (b >> 23) & 0xFF, b & 0x7FFFFF
    shift = (126 - exp).clamp(0, 40)
    man = torch.where(exp < 127, (0x400000 | (man >> 1)) >> shift, man)
    exp = exp.clamp(min=126) - 126
    code = ((((exp << 2) | (man >> 21)) + 1) >> 1).clamp(max=7) | (sign << 3)
    code = code.reshape(n, cols // 2, 2)
    blocks = (code[..., 0] | (code[..., 1] << 4)).to(torch.uint8).reshape(n, cols // 32, 16)
    return blocks, (dbits >> 23).to(torch.uint8).reshape(n, cols // 32)


def test_quantizer_matches_the_bitwise_rule_on_ties_subnormals_and_zero_blocks():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g) * torch.logspace(-40, 3, 64)[:, None]
    W[0, :32] = 0  # an all-zero block
    W[1, :32] = torch.tensor([6.0, 0.75, 0.25, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)  # every tie, amax 6 → scale 1
    W[1, 32:64] = -W[1, :32]
    W[2, :32] = 1e-39  # subnormal fp32: the scale rounds up to 2^-126
    W[3, :32] = -1e-3  # negatives that round to -0 (code 8) next to a larger amax
    W[3, 0] = 100.0
    blocks, scales = M.quantize_rows(W)
    rb, rs = _bitwise_reference(W)
    assert torch.equal(scales, rs) and torch.equal(blocks, rb)
    # ties round away from zero: 6→6, 0.75→1 | 0.25→0.5, 1.25→1.5 | 1.75→2, 2.5→3 | 3.5→4, 5→6 (low nibble first)
    assert blocks[1, 0, :4].tolist() == [0x27, 0x31, 0x54, 0x76] and blocks[1, 1, 0] == 0xAF
    assert scales[1, 0] == 127 and scales[0, 0] == 0 and blocks[0, 0].eq(0).all()
    assert blocks[3, 0, 1] == 0x88  # -0.001·(1/2^4) rounds to -0


def test_dequantize_equals_transformers_convert_moe_packed_tensors():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 40, 2), generator=g, dtype=torch.uint8)  # every byte but 255 (NaN)
    ours = M.dequantize(blocks, scales)
    assert ours.shape == (3, 64, 40)
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert torch.equal(ours.to(torch.bfloat16).float(), ours)  # why the source may serve bf16: exact
    per_elem = scales[..., None].expand(*scales.shape, 32).reshape(3, 40, 64).transpose(1, 2)
    normal = (per_elem > 140) & (per_elem < 250)  # bf16-normal and finite: a grid point re-quantizes to itself
    b2, s2 = M.quantize(torch.where(normal, ours, 0.0))
    assert torch.equal(M.dequantize(b2, s2), torch.where(normal, ours, 0.0))


# --- a tiny gpt-oss -----------------------------------------------------------------------------------------
def _config():
    import transformers as tf

    return tf.GptOssConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, intermediate_size=32, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"])


def _mxfp4_folder(src: Path, dst: Path) -> None:
    """`src` (a 16-bit gpt-oss folder) with its experts stored as OpenAI ships them, by our quantizer."""
    dst.mkdir()
    out = {}
    for k, v in load_file(src / "model.safetensors").items():
        if k.endswith(EXPERTS):
            out[k + "_blocks"], out[k + "_scales"] = M.quantize(v)
        else:
            out[k] = v
    save_file(out, dst / "model.safetensors", {"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (dst / "config.json").write_text(json.dumps(cfg))


def _load_dequantized(folder: Path):
    import transformers as tf

    return tf.GptOssForCausalLM.from_pretrained(folder, quantization_config=tf.Mxfp4Config(dequantize=True),
                                                dtype=torch.float32).eval()


def _attention_only(src: Path, dst: Path) -> None:
    """PEFT's adapter without its expert parameters: the q_proj LoRA alone."""
    dst.mkdir()
    sd = load_file(src / "adapter_model.safetensors")
    save_file({k: v for k, v in sd.items() if ".self_attn." in k}, dst / "adapter_model.safetensors")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_parameters"] = None
    (dst / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    """Folders: plain (fp32, as built), mx (MXFP4 base), adapter (PEFT target_parameters + q_proj); `ref`: PEFT's
    merge_and_unload state dict on the model transformers dequantizes from `mx`; its logits."""
    import transformers as tf
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(_config()).eval()
    model.save_pretrained(root / "plain")  # fp32
    _mxfp4_folder(root / "plain", root / "mx")
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False,
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    pm.save_pretrained(root / "adapter")
    _attention_only(root / "adapter", root / "attn")
    deq = _load_dequantized(root / "mx")
    stored = load_file(root / "mx" / "model.safetensors")
    for k, v in deq.state_dict().items():  # transformers' dequantized experts are ours, bit for bit
        if k.endswith(EXPERTS):
            assert torch.equal(v, M.dequantize(stored[k + "_blocks"], stored[k + "_scales"])), k
    merged = PeftModel.from_pretrained(deq, root / "adapter").merge_and_unload()
    with torch.no_grad():
        logits = merged(X).logits
    ref = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return dict(root=root, ref=ref, logits=logits)


def test_merge_into_mxfp4_base_fp32_equals_peft_on_the_dequantized_model(oss, tmp_path):
    out = tmp_path / "o32"
    loraport.merge(oss["root"] / "mx", oss["root"] / "adapter", out, dtype="fp32")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(oss["ref"])
    assert max(float((got[k] - oss["ref"][k]).abs().max()) for k in got) <= 1e-5
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    import transformers as tf

    with torch.no_grad():
        logits = tf.GptOssForCausalLM.from_pretrained(out).eval()(X).logits
    assert float((logits - oss["logits"]).abs().max()) <= 1e-4


def test_merge_writes_mxfp4_back_with_our_codes_of_peft_merged_weights(oss, tmp_path):
    out = tmp_path / "omx"
    rep = loraport.merge(oss["root"] / "mx", oss["root"] / "adapter", out)
    got = load_file(out / "model.safetensors")
    base = load_file(oss["root"] / "mx" / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    for k, v in oss["ref"].items():
        if k.endswith(EXPERTS):
            b, s = M.quantize(v)
            assert torch.equal(got[k + "_blocks"], b) and torch.equal(got[k + "_scales"], s), k
    assert torch.equal(got["model.layers.0.mlp.router.weight"], base["model.layers.0.mlp.router.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    rows = [r for r in rep["quantization"] if r["name"] != "(total)"]
    assert len(rows) == 4 and all(r["layout"] == "mxfp4 e2m1/e8m0" for r in rows)
    assert all(0.5 < r["delta_retained"] < 1.5 and r["codes_changed"] > 0 for r in rows)
    total = rep["quantization"][-1]
    assert total["updated_tensors"] == 4 and total["erased_tensors"] == 0
    deq = _load_dequantized(out)  # transformers loads what was written, to the dequantized codes
    for k, v in deq.state_dict().items():
        if k.endswith(EXPERTS):
            assert torch.equal(v, M.dequantize(got[k + "_blocks"], got[k + "_scales"]))


def test_untouched_mxfp4_parameters_are_copied_byte_for_byte(oss, tmp_path):
    rep = loraport.merge(oss["root"] / "mx", oss["root"] / "attn", tmp_path / "o")
    got, base = load_file(tmp_path / "o" / "model.safetensors"), load_file(oss["root"] / "mx" / "model.safetensors")
    packed = [k for k in base if k.endswith(("_blocks", "_scales"))]
    assert len(packed) == 8 and all(torch.equal(got[k], base[k]) for k in packed)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], base[q])
    assert not rep["quantization"]  # nothing re-quantized


def test_a_small_delta_is_reported_erased_and_inspect_names_the_layout(oss, tmp_path):
    """At 1/100 of its weight the adapter moves few E2M1 codes: the report says most of it is lost and how to
    keep it; `inspect --base` shows the experts' storage and what a merge writes."""
    from loraport.inspection import base_storage
    from loraport.merging import open_base

    rep = loraport.merge(oss["root"] / "mx", [(oss["root"] / "adapter", 0.01)], tmp_path / "o")
    total = rep["quantization"][-1]
    assert total["erased_tensors"] == 4 and total["delta_retained_median"] < 0.5
    assert any("--dtype bf16" in w for w in rep["warnings"])
    ck = open_base(oss["root"] / "mx")
    try:
        st = base_storage(ck)
    finally:
        ck.close()
    assert st["families"]["model.layers.*.mlp.experts.gate_up_proj"].startswith("mxfp4")
    assert st["merge_writes"].startswith("the same layout")


def test_dtype_bf16_and_quantize_mxfp4_from_a_16bit_folder(oss, tmp_path):
    root = oss["root"]
    loraport.merge(root / "mx", root / "adapter", tmp_path / "b16", dtype="bf16")
    b16 = load_file(tmp_path / "b16" / "model.safetensors")
    k = "model.layers.1.mlp.experts.gate_up_proj"
    assert b16[k].dtype == torch.bfloat16  # PEFT's merge (≤1e-5 away in fp32), rounded to bf16
    assert torch.allclose(b16[k].float(), oss["ref"][k], rtol=2 ** -8, atol=1e-5)
    assert "quantization_config" not in json.loads((tmp_path / "b16" / "config.json").read_text())
    # the unquantized gpt-oss written as MXFP4: our quantizer of the merged weights, in OpenAI's layout
    loraport.merge(root / "plain", root / "adapter", tmp_path / "f32", dtype="fp32")
    loraport.merge(root / "plain", root / "adapter", tmp_path / "q", quantize="mxfp4")
    f32, q = load_file(tmp_path / "f32" / "model.safetensors"), load_file(tmp_path / "q" / "model.safetensors")
    assert set(q) == set(load_file(root / "mx" / "model.safetensors"))
    for name in f32:
        if name.endswith(EXPERTS):
            b, s = M.quantize(f32[name])
            assert torch.equal(q[name + "_blocks"], b) and torch.equal(q[name + "_scales"], s)
        else:
            assert torch.equal(q[name], f32[name])
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    _load_dequantized(tmp_path / "q")


def test_quantize_mxfp4_refuses_a_model_that_is_not_gpt_oss(tmp_path):
    from tests._quant_util import BF16, LORA

    with pytest.raises(BadInputError, match="gpt_oss"):
        loraport.merge(BF16, LORA, tmp_path / "o", quantize="mxfp4")
    assert not (tmp_path / "o").exists()


# --- damaged bases -----------------------------------------------------------------------------------------
P = "model.layers.0.mlp.experts.gate_up_proj"
DAMAGE = {
    "scales not matching blocks": (lambda sd, c: sd.__setitem__(P + "_scales", sd[P + "_scales"][:, :, :1].clone()),
                                   "does not match its blocks"),
    "odd block width": (lambda sd, c: sd.__setitem__(P + "_blocks", sd[P + "_blocks"][..., :8].clone()),
                        "two FP4 codes a byte"),
    "scales missing": (lambda sd, c: sd.pop(P + "_scales"), "no 'model.layers.0.mlp.experts.gate_up_proj_scales'"),
    "scales as float": (lambda sd, c: sd.__setitem__(P + "_scales", sd[P + "_scales"].float()), "expected uint8"),
    "shape against config": (lambda sd, c: c.__setitem__("intermediate_size", 16), "config.json"),
    "NaN scale byte": (lambda sd, c: sd[P + "_scales"].view(-1)[5:6].fill_(255), "E8M0 byte 255 (NaN)"),
    "no blocks": (lambda sd, c: [sd.pop(k) for k in [k for k in sd if k.endswith(("_blocks", "_scales"))]],
                  "no tensor is stored as MXFP4"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_mxfp4_base_is_one_line_exit_2(oss, tmp_path, case):
    edit, msg = DAMAGE[case]
    base = edit_folder(oss["root"] / "mx", edit)(tmp_path)
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    res = cli("merge", "--base", base, "--adapter", oss["root"] / "adapter", "--out", tmp_path / "never")
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output and not (tmp_path / "never").exists()
    assert before == {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}


def test_truncated_mxfp4_base_is_one_line_exit_2(oss, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(oss["root"] / "mx", base)
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    res = cli("merge", "--base", base, "--adapter", oss["root"] / "adapter", "--out", tmp_path / "never")
    assert res.exit_code == 2 and "truncated" in res.output and "Traceback" not in res.output


@pytest.mark.gpu
def test_cuda_merge_into_mxfp4_base_equals_cpu(oss, tmp_path):
    """The codec is plain torch: on CUDA it writes the codes the CPU writes, up to the fp32 merge's last bit
    (GEMM order) moving a value across a rounding midpoint."""
    root = oss["root"]
    loraport.merge(root / "mx", root / "adapter", tmp_path / "cpu", device="cpu")
    loraport.merge(root / "mx", root / "adapter", tmp_path / "gpu", device="cuda")
    a, b = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(("_blocks", "_scales")):
            assert float((a[k] != b[k]).float().mean()) <= 1e-2, k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7), k
