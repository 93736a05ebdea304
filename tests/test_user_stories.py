"""The README's recipes, run the way a user runs them (the documented commands and flags, through the real CLI),
on tiny locally built models, with the peers as oracles: PEFT's *unmerged* forward, diffusers'
load_lora_weights + fuse_lora, transformers + bitsandbytes loading our 4-bit folders, the gguf package reading our
GGUF, onnxruntime running our graphs and .onnx_adapter files. One test per README story."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._onnx_util import LogitsOnly
from tests._story_util import (PEFT_FX, QUANT_FX, ROOT, SD_FX, bnb_dequantized, cli, corrupt_one_onnx_weight,
                               diff_stats, hf_model, lm_logits, ok, ort_logits, peft_merged_state, peft_unmerged,
                               quiet, read_json, token_ids)

pytest.importorskip("transformers")
pytest.importorskip("peft")
quiet()

LLAMA = PEFT_FX / "bases" / "llama"
LLAMA_SHARDED = PEFT_FX / "bases" / "llama_sharded"
PLAIN = PEFT_FX / "adapters" / "llama_plain"
PLAIN2 = PEFT_FX / "adapters" / "llama_plain2"
RSLORA = PEFT_FX / "adapters" / "llama_rslora_patterns"
FP32_LOGITS_TOL = 1e-4  # fp32 merged vs fp32 unmerged: only summation order differs


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ================================================================================================ story 1
def test_story1_merge_peft_adapter_into_hf_model(tmp_path):
    """README "Merge a PEFT adapter into a Hugging Face model": inspect, merge, weighted two-adapter merge with
    --dtype bf16 --device auto --shard-size; outputs load with plain from_pretrained and give PEFT's logits."""
    cfg = read_json(PLAIN / "adapter_config.json")

    # loraport inspect ./my-adapter
    res = cli("inspect", PLAIN)
    ok(res, f"inspect {PLAIN}")
    assert "peft" in res.stdout and str(cfg["r"]) in res.stdout and str(cfg["lora_alpha"]) in res.stdout, res.stdout

    # loraport merge --base ./Llama-3-8B --adapter ./my-adapter --out ./merged
    merged = tmp_path / "merged"
    ok(cli("merge", "--base", LLAMA, "--adapter", PLAIN, "--out", merged), "merge (single adapter)")
    for f in LLAMA.iterdir():  # "--out mirrors the base: ... config, generation config, tokenizer and chat template"
        assert (merged / f.name).is_file(), f"{f.name} of the base is missing from --out"
    ids = token_ids(read_json(LLAMA / "config.json")["vocab_size"])
    got = lm_logits(hf_model(merged), ids)
    want = lm_logits(peft_unmerged(LLAMA, [(PLAIN, 1.0)]), ids)
    base_logits = lm_logits(hf_model(LLAMA), ids)
    assert (want - base_logits).abs().max() > 100 * FP32_LOGITS_TOL, "adapter too weak for a meaningful check"
    d, _ = diff_stats(got, want)
    assert d <= FP32_LOGITS_TOL, f"merged (transformers) vs PEFT unmerged logits: max|Δ| {d:.3g}"

    # loraport inspect ./merged shows the provenance (adapter, its sha256, weight)
    res = cli("inspect", merged)
    ok(res, "inspect ./merged")
    assert str(PLAIN) in res.stdout and _sha256(PLAIN / "adapter_model.safetensors") in res.stdout, res.stdout

    # loraport merge --base ./Llama-3-8B --adapter ./style --adapter ./domain --weight 0.7 --weight 0.3 \
    #                --out ./merged-mix --dtype bf16 --device auto --shard-size 5GB   (a size that splits this base)
    mix = tmp_path / "merged-mix"
    shard = 40_000
    ok(cli("merge", "--base", LLAMA_SHARDED, "--adapter", PLAIN, "--adapter", RSLORA, "--weight", "0.7",
           "--weight", "0.3", "--out", mix, "--dtype", "bf16", "--device", "auto", "--shard-size", "40KB"),
       "merge (two weighted adapters, bf16, --shard-size 40KB)")
    index = read_json(mix / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2, f"--shard-size 40KB on a ~55 KB bf16 model wrote {shards}"
    from safetensors import safe_open

    for s in shards:
        with safe_open(str(mix / s), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        nbytes = sum(2 * int(torch.Size(sh).numel()) for sh in sizes)
        assert dtypes == {"BF16"}, f"{s}: dtypes {dtypes}, asked --dtype bf16"
        assert nbytes <= shard or len(sizes) == 1, f"{s}: {nbytes} bytes of tensors > --shard-size {shard}"
    model = hf_model(mix)
    assert next(model.parameters()).dtype == torch.bfloat16
    got = lm_logits(model.float(), ids)
    oracle = peft_unmerged(LLAMA_SHARDED, [(PLAIN, 0.7), (RSLORA, 0.3)])
    want = lm_logits(oracle, ids)
    # the bound: what rounding the *oracle's own* merged weights to bf16 costs, ×2 (rounding happens once in both)
    rounded = oracle.merge_and_unload().to(torch.bfloat16).float()
    bf16_cost = (lm_logits(rounded, ids) - want).abs().max().item()
    d, cos = diff_stats(got, want)
    assert d <= 2 * bf16_cost + 1e-6, f"bf16 mix vs PEFT unmerged: max|Δ| {d:.3g} (bf16 rounding costs {bf16_cost:.3g})"
    d_r, _ = diff_stats(got, lm_logits(rounded, ids))
    print(f"story1: fp32 merge vs PEFT max|Δ| logits ≤ {FP32_LOGITS_TOL}; bf16 mix vs PEFT {d:.3g} "
          f"(cos {cos:.6f}), vs PEFT-merged-then-bf16 {d_r:.3g}")


# ================================================================================================ story 2
GGUF_NAMES = {  # HF Llama module → llama.cpp GGUF tensor (per llama.cpp's tensor map), per block
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf row permutation of q/k (HF rotary halves → interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _sd_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), tokenizer=None, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)


def _sd_state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def _fused(folder: Path, lora: Path, scale: float) -> dict[str, torch.Tensor]:
    """diffusers as the oracle: load_lora_weights + fuse_lora(lora_scale=scale)."""
    pipe = _sd_pipeline(folder)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return _sd_state(pipe)


def _max_diff(a: dict, b: dict, keys) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def test_story2_kohya_into_stable_diffusion_and_convert(tmp_path):
    """README "Merge a kohya LoRA into a Stable Diffusion checkpoint": inspect, merge into a single-file checkpoint
    and into a diffusers folder (--weight 0.8) — each equal to diffusers load_lora_weights + fuse_lora — then
    `convert` kohya → diffusers (read back by diffusers) and PEFT → GGUF with --base (read back by gguf)."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tests._sd_util import save_single

    kohya, base = SD_FX / "kohya_peft.safetensors", SD_FX / "base"
    res = cli("inspect", kohya)
    ok(res, "inspect kohya")
    assert "kohya" in res.stdout, res.stdout

    base_state = _sd_state(_sd_pipeline(base))
    fused1, fused08 = _fused(base, kohya, 1.0), _fused(base, kohya, 0.8)
    changed = sorted(k for k in base_state if not torch.equal(base_state[k], fused1[k]))
    assert len(changed) > 50, "the LoRA should touch the UNet and the text encoder"

    # loraport merge --base ./stable-diffusion-v1-5 --adapter ./pixel-art.safetensors --weight 0.8 --out ./sd15-pixel
    out = tmp_path / "sd15-pixel"
    ok(cli("merge", "--base", base, "--adapter", kohya, "--weight", "0.8", "--out", out), "merge kohya → folder")
    got = _sd_state(_sd_pipeline(out))  # the output loads as a diffusers pipeline
    d_folder = _max_diff(got, fused08, base_state)
    assert d_folder <= 1e-5, f"diffusers-folder merge vs diffusers fuse_lora(0.8): max|Δ| {d_folder:.3g}"

    # loraport merge --base ./sd_xl_base_1.0.safetensors --adapter ./pixel-art.safetensors --out ./x.safetensors
    single = tmp_path / "sd15.safetensors"
    save_single(base_state, single, xl=False)
    out_single = tmp_path / "sd15-pixel.safetensors"
    ok(cli("merge", "--base", single, "--adapter", kohya, "--out", out_single), "merge kohya → single file")
    assert out_single.is_file(), "a single-file base must give a single-file output"
    from safetensors.torch import load_file

    sf = load_file(str(out_single))
    unet_cfg = read_json(base / "unet" / "config.json")
    back = {"unet." + k: v for k, v in convert_ldm_unet_checkpoint(sf, unet_cfg).items()}  # diffusers' converter
    back.update({"text_encoder." + k[len("cond_stage_model.transformer."):]: v for k, v in sf.items()
                 if k.startswith("cond_stage_model.transformer.")})
    keys = [k for k in base_state if k in back]
    assert set(changed) <= set(keys), f"single-file output lost tensors: {sorted(set(changed) - set(keys))[:5]}"
    d_single = _max_diff(back, fused1, keys)
    assert d_single <= 1e-5, f"single-file merge vs diffusers fuse_lora: max|Δ| {d_single:.3g}"

    # loraport convert ./pixel-art.safetensors --to diffusers --out ./pixel-art-diffusers   (+ --base: see below)
    conv = tmp_path / "pixel-art-diffusers"
    ok(cli("convert", kohya, "--to", "diffusers", "--out", conv, "--base", base), "convert kohya → diffusers")
    files = [conv] if conv.is_file() else sorted(conv.glob("*.safetensors"))
    assert len(files) == 1, files
    d_conv = _max_diff(_fused(base, files[0], 1.0), fused1, changed)
    assert d_conv <= 1e-5, f"diffusers reading our converted file vs the kohya original: max|Δ| {d_conv:.3g}"

    # loraport convert ./my-adapter --to gguf --out ./my-adapter.gguf --base ./Llama-3-8B
    import gguf
    from safetensors.torch import load_file as st_load

    gg = tmp_path / "my-adapter.gguf"
    ok(cli("convert", PLAIN, "--to", "gguf", "--out", gg, "--base", LLAMA), "convert peft → gguf")
    reader = gguf.GGUFReader(str(gg))
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    cfg, hf_cfg = read_json(PLAIN / "adapter_config.json"), read_json(LLAMA / "config.json")
    peft_sd = st_load(str(PLAIN / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    worst, n = 0.0, 0
    for key, A in peft_sd.items():
        if ".lora_A." not in key:
            continue
        layer = int(key.split(".layers.")[1].split(".")[0])
        module = key.split(f".layers.{layer}.")[1].split(".lora_A")[0]
        want = scale * peft_sd[key.replace("lora_A", "lora_B")].float() @ A.float()
        if module == "self_attn.q_proj":
            want = _llamacpp_permute(want, hf_cfg["num_attention_heads"])
        elif module == "self_attn.k_proj":
            want = _llamacpp_permute(want, hf_cfg["num_key_value_heads"])
        g = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        a, b = tensors[g + ".lora_a"], tensors[g + ".lora_b"]
        got_dw = (alpha / a.shape[0]) * b @ a
        worst, n = max(worst, (got_dw - want).abs().max().item()), n + 1
    assert n == len([k for k in peft_sd if ".lora_A." in k]) and n > 0
    assert worst <= 1e-6, f"GGUF ΔW (read by the gguf package, llama.cpp layout) vs PEFT ΔW: max|Δ| {worst:.3g}"
    # ... and the GGUF file merges (loraport reads it back against the base) to PEFT's own merge
    m_gg = tmp_path / "merged-from-gguf"
    ok(cli("merge", "--base", LLAMA, "--adapter", gg, "--out", m_gg), "merge the converted GGUF")
    ref = peft_merged_state(LLAMA, PLAIN)
    got_sd = st_load(str(m_gg / "model.safetensors"))
    d_gg = max((got_sd[k].float() - ref[k].float()).abs().max().item() for k in got_sd)
    assert d_gg <= 1e-5, f"merge(GGUF converted from PEFT) vs PEFT merge_and_unload: max|Δ| {d_gg:.3g}"
    print(f"story2: folder {d_folder:.2g}, single file {d_single:.2g}, kohya→diffusers {d_conv:.2g}, "
          f"GGUF ΔW {worst:.2g}, GGUF merge {d_gg:.2g}")


def test_story2_readme_convert_kohya_to_diffusers_verbatim(tmp_path):
    """The README's kohya → diffusers line exactly as written there (its placeholder paths mapped to fixtures)."""
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(ln.strip() for ln in readme.splitlines() if ln.strip().startswith("loraport convert")
                and "--to diffusers" in ln)
    paths = {"./pixel-art.safetensors": SD_FX / "kohya_peft.safetensors", "./stable-diffusion-v1-5": SD_FX / "base",
             "./pixel-art-diffusers": tmp_path / "pixel-art-diffusers"}
    args = shlex.split(line.split("#")[0])[1:]
    unknown = [a for a in args if a.startswith("./") and a not in paths]
    assert not unknown, f"README line {line!r}: no fixture for {unknown}"
    ok(cli(*[paths.get(a, a) for a in args]), " ".join(args))


# ================================================================================================ story 3
Q_BASE, Q_NF4, Q_LORA = QUANT_FX / "llama-bf16", QUANT_FX / "llama-nf4-dq", QUANT_FX / "lora-small"


def _bnb_quantized_reference(tmp_path: Path, state: dict[str, torch.Tensor], double_quant: bool):
    """bitsandbytes' own quantization (through transformers) of a given fp32 state, as the yardstick for the
    error 4-bit rounding alone costs."""
    from transformers import BitsAndBytesConfig

    model = hf_model(Q_BASE, dtype=torch.float32)
    model.load_state_dict(state)
    src = tmp_path / f"ref32-{double_quant}"
    model.save_pretrained(src)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    return hf_model(src, quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")


def _is_4bit(model, nested: bool | None = None) -> bool:
    w = model.model.layers[0].self_attn.q_proj.weight
    qs = getattr(w, "quant_state", None)
    return qs is not None and (nested is None or bool(qs.nested) == nested)


def _quant_report(res) -> list[dict]:
    """The per-layer rows of `merge --json`'s quantization report (without its "(total)" summary row)."""
    return [r for r in json.loads(res.stdout)["quantization"] if r.get("name") != "(total)"]


def _warned_erased(res) -> bool:
    """The README: loraport "warns when the adapter is mostly erased" — on stderr, or in the --json summary."""
    return "erased most" in (res.stderr + res.stdout).lower()


@pytest.fixture(scope="module")
def fp32_merged():
    """PEFT's fp32 merge of the QLoRA adapter into the 16-bit base, and its logits (the reference of story 3)."""
    pytest.importorskip("bitsandbytes")
    state = peft_merged_state(Q_BASE, Q_LORA)
    ids = token_ids(read_json(Q_BASE / "config.json")["vocab_size"], seed=3)
    model = hf_model(Q_BASE, dtype=torch.float32)
    model.load_state_dict(state)
    return state, ids, lm_logits(model, ids), lm_logits(hf_model(Q_BASE, dtype=torch.float32), ids)


def test_story3a_qlora_to_nf4_double_quant_loads_in_transformers(tmp_path, fp32_merged):
    """`loraport merge --base ./llama --adapter ./qlora-adapter --out ./merged-nf4 --quantize nf4 --double-quant`:
    transformers + bitsandbytes load it with plain from_pretrained (CPU) and its logits are as close to the fp32
    merged model as bitsandbytes' own nf4 quantization of that model is."""
    state, ids, ref, _ = fp32_merged
    out = tmp_path / "merged-nf4"
    ok(cli("merge", "--base", Q_BASE, "--adapter", Q_LORA, "--out", out, "--quantize", "nf4", "--double-quant"),
       "merge --quantize nf4 --double-quant")
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True, qc
    model = hf_model(out)  # plain from_pretrained, no extra arguments
    assert _is_4bit(model, nested=True), "transformers did not load 4-bit double-quantized layers"
    got = lm_logits(model, ids)
    d, cos = diff_stats(got, ref)
    bnb = lm_logits(_bnb_quantized_reference(tmp_path, state, double_quant=True), ids)
    d_bnb, cos_bnb = diff_stats(bnb, ref)
    d_same, _ = diff_stats(got, bnb)
    print(f"story3a: nf4+dq vs fp32 merged: max|Δ| {d:.3g} cos {cos:.5f}; bitsandbytes' own nf4 of the fp32 merge: "
          f"max|Δ| {d_bnb:.3g} cos {cos_bnb:.5f}; ours vs bitsandbytes' {d_same:.3g}; |logits| ≤ {ref.abs().max():.3g}")
    assert cos >= 0.99, f"nf4 output vs fp32 merged: cosine {cos:.5f}"
    assert d <= 1.5 * d_bnb + 1e-3, f"nf4 output vs fp32 merged max|Δ| {d:.3g} > 1.5 × bitsandbytes' own {d_bnb:.3g}"


def test_story3b_fp16_base_requantize_keeps_the_adapter(tmp_path, fp32_merged):
    """`loraport merge --base ./llama-bnb-4bit --fp16-base ./llama --adapter ./qlora-adapter --quantize nf4 --out
    ./merged-nf4` (+ --json for the per-layer report the README promises): loads in transformers, keeps the delta
    the plain re-quantization erases (and warns about), and lands as close to the fp32 merge as bitsandbytes does."""
    state, ids, ref, base_logits = fp32_merged
    naive = tmp_path / "requant"
    res_naive = cli("merge", "--base", Q_NF4, "--adapter", Q_LORA, "--quantize", "nf4", "--out", naive, "--json")
    ok(res_naive, "merge --base bnb-4bit --quantize nf4 --json")
    assert _warned_erased(res_naive), "re-quantizing dequant(W4) + ΔW erases this adapter: README promises a warning"
    out = tmp_path / "merged-nf4"
    res = cli("merge", "--base", Q_NF4, "--fp16-base", Q_BASE, "--adapter", Q_LORA, "--quantize", "nf4", "--out",
              out, "--json")
    ok(res, "merge --base bnb-4bit --fp16-base 16-bit --quantize nf4")
    assert not _warned_erased(res), "--fp16-base keeps the delta: no erased-adapter warning expected"
    kept = sorted(r["delta_retained"] for r in _quant_report(res))
    kept_naive = sorted(r["delta_retained"] for r in _quant_report(res_naive))
    med, med_naive = kept[len(kept) // 2], kept_naive[len(kept_naive) // 2]
    assert len(kept) == 7 and med >= 0.5 > med_naive, (
        f"median delta kept: --fp16-base {med:.3f}, re-quantizing the 4-bit base {med_naive:.3f}")
    model = hf_model(out)
    assert _is_4bit(model)
    got = lm_logits(model, ids)
    d, cos = diff_stats(got, ref)
    dq = read_json(out / "config.json")["quantization_config"]["bnb_4bit_use_double_quant"]
    d_bnb, _ = diff_stats(lm_logits(_bnb_quantized_reference(tmp_path, state, double_quant=dq), ids), ref)
    d_naive, _ = diff_stats(lm_logits(hf_model(naive), ids), ref)
    print(f"story3b: --fp16-base nf4 vs fp32 merged max|Δ| {d:.3g} cos {cos:.5f} (bitsandbytes' own {d_bnb:.3g}; "
          f"re-quantized 4-bit base {d_naive:.3g}); median delta kept {med:.3f} vs {med_naive:.3f}")
    assert d <= 1.5 * d_bnb + 1e-3, f"--fp16-base output vs fp32 merged {d:.3g} > 1.5 × bitsandbytes' {d_bnb:.3g}"


def test_story3c_bnb_4bit_base_to_16bit_output(tmp_path):
    """`loraport merge --base ./llama-bnb-4bit --adapter ./qlora-adapter --out ./merged` (a base saved by
    transformers + bitsandbytes): a 16-bit folder that plain from_pretrained loads, equal to merging into the
    weights bitsandbytes dequantizes (oracle: PEFT unmerged on the dequantized model)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "merged"
    ok(cli("merge", "--base", Q_NF4, "--adapter", Q_LORA, "--out", out), "merge --base bnb-4bit (16-bit out)")
    deq = bnb_dequantized(hf_model(Q_NF4, device_map="cpu"))
    ref_model = hf_model(Q_BASE, dtype=torch.float32)
    missing, unexpected = ref_model.load_state_dict(deq, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    deq_dir = tmp_path / "dequantized"
    ref_model.save_pretrained(deq_dir)
    ids = token_ids(read_json(Q_BASE / "config.json")["vocab_size"], seed=3)
    oracle = peft_unmerged(deq_dir, [(Q_LORA, 1.0)])
    want = lm_logits(oracle, ids)
    bf16_cost = (lm_logits(oracle.merge_and_unload().to(torch.bfloat16).float(), ids) - want).abs().max().item()
    cfg = read_json(out / "config.json")
    assert "quantization_config" not in cfg, "16-bit output still declares quantization_config (bnb 4-bit)"
    model = hf_model(out)
    assert not _is_4bit(model) and next(model.parameters()).dtype == torch.bfloat16
    d, cos = diff_stats(lm_logits(model.float(), ids), want)
    print(f"story3c: 16-bit from bnb-4bit base vs PEFT on dequantized base: max|Δ| {d:.3g} cos {cos:.6f} "
          f"(bf16 rounding costs {bf16_cost:.3g})")
    assert d <= 2 * bf16_cost + 1e-6, f"max|Δ| {d:.3g} vs bf16 rounding {bf16_cost:.3g}"


# ================================================================================================ story 4
def _export_base_with_torch(path: Path) -> None:
    """The base exported by someone else (torch.onnx, TorchScript exporter: weight names lost, MatMul weights
    stored transposed) — the `loraport merge --base ./model.onnx` case."""
    import warnings

    m = hf_model(LLAMA, dtype=torch.float32)
    ids = token_ids(128, seq=7)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "b", 1: "s"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(m), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=dyn)


def test_story4_onnx_export_and_ci_parity_gate(tmp_path):
    """README "Export ONNX and gate CI on parity": convert --to onnx, then `validate ... --tolerance auto --json >
    parity.json` in a real process (exit 0, stdout is JSON); a corrupted weight makes validate exit 1; multi-LoRA
    export + an .onnx_adapter for another adapter; baking into a model.onnx exported by torch.onnx."""
    pytest.importorskip("onnxruntime")
    ids = token_ids(read_json(LLAMA / "config.json")["vocab_size"], seed=5)
    peft_plain = lm_logits(peft_unmerged(LLAMA, [(PLAIN, 1.0)]), ids)

    # loraport convert --to onnx --base ./llama --adapter ./lora --out ./onnx-merged --dtype fp32
    merged = tmp_path / "onnx-merged"
    ok(cli("convert", "--to", "onnx", "--base", LLAMA, "--adapter", PLAIN, "--out", merged, "--dtype", "fp32"),
       "convert --to onnx")
    d_export, _ = diff_stats(ort_logits(merged / "model.onnx", ids), peft_plain)
    assert d_export <= FP32_LOGITS_TOL, f"ORT logits of the merged export vs PEFT unmerged: max|Δ| {d_export:.3g}"

    # loraport validate ./onnx-merged --base ./llama --adapter ./lora --tolerance auto --json > parity.json
    # (a real process, as CI runs it; started now, collected below while the in-process steps run)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parity_json = tmp_path / "parity.json"
    with open(parity_json, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "loraport", "validate", str(merged), "--base", str(LLAMA),
                                 "--adapter", str(PLAIN), "--tolerance", "auto", "--json"], stdout=fh,
                                stderr=subprocess.PIPE, text=True, cwd=str(tmp_path), env=env)
    try:
        _story4_rest(tmp_path, ids, merged, peft_plain)
    finally:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, f"validate exited {proc.returncode}: {err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    parity = json.loads(parity_json.read_text())  # `> parity.json` must hold JSON and nothing else
    assert parity["passed"] is True and parity["cases"], parity
    reported = max(o["max_abs"] for c in parity["cases"] for o in c["outputs"].values())
    assert reported <= FP32_LOGITS_TOL
    print(f"story4: export {d_export:.2g} (validate reports {reported:.2g})")


def _story4_rest(tmp_path: Path, ids: torch.Tensor, merged: Path, peft_plain: torch.Tensor) -> None:
    # one corrupted weight in the exported model: validate must fail (exit 1) and say so in the JSON
    bad = tmp_path / "onnx-corrupted"
    shutil.copytree(merged, bad)
    hit = corrupt_one_onnx_weight(bad, "layers.1.mlp.down_proj")
    d_bad, _ = diff_stats(ort_logits(bad / "model.onnx", ids), peft_plain)
    assert d_bad > 100 * FP32_LOGITS_TOL, f"corrupting {hit} should move the logits (moved {d_bad:.3g})"
    res = cli("validate", bad, "--base", LLAMA, "--adapter", PLAIN, "--tolerance", "auto", "--json")
    assert res.exit_code == 1, f"validate on a corrupted {hit}: exit {res.exit_code} (want 1)\n{res.stderr[-1500:]}"
    assert json.loads(res.stdout)["passed"] is False

    # loraport convert --to onnx --multi-lora --base ./llama --adapter ./qa --adapter ./summarize --out ./onnx-multi
    multi = tmp_path / "onnx-multi"
    ok(cli("convert", "--to", "onnx", "--multi-lora", "--base", LLAMA, "--adapter", PLAIN, "--adapter", RSLORA,
           "--out", multi), "convert --to onnx --multi-lora")
    # loraport convert ./another-adapter --to onnx-adapter --graph ./onnx-multi --out ./chat.onnx_adapter
    chat = tmp_path / "chat.onnx_adapter"
    ok(cli("convert", PLAIN2, "--to", "onnx-adapter", "--graph", multi, "--out", chat), "convert --to onnx-adapter")
    graph = multi / "model.onnx"
    d_none, _ = diff_stats(ort_logits(graph, ids), lm_logits(hf_model(LLAMA), ids))
    d_chat, _ = diff_stats(ort_logits(graph, ids, chat), lm_logits(peft_unmerged(LLAMA, [(PLAIN2, 1.0)]), ids))
    own = sorted((multi / "adapters").glob("*.onnx_adapter"))
    assert len(own) == 2, own
    rs = [a for a in own if "rslora" in a.name]
    d_rs, _ = diff_stats(ort_logits(graph, ids, rs[0]), lm_logits(peft_unmerged(LLAMA, [(RSLORA, 1.0)]), ids))
    assert max(d_none, d_chat, d_rs) <= FP32_LOGITS_TOL, (
        f"multi-LoRA graph vs transformers/PEFT: no adapter {d_none:.3g}, chat {d_chat:.3g}, rslora {d_rs:.3g}")
    res = cli("validate", multi, "--json")  # base and adapters from the export's manifest, each adapter active
    ok(res, "validate ./onnx-multi")
    assert json.loads(res.stdout)["passed"] is True

    # loraport merge --base ./model.onnx --adapter ./lora --out ./model-lora.onnx
    base_onnx = tmp_path / "model.onnx"
    _export_base_with_torch(base_onnx)
    before = _sha256(base_onnx)
    baked = tmp_path / "model-lora.onnx"
    ok(cli("merge", "--base", base_onnx, "--adapter", PLAIN, "--out", baked), "merge --base model.onnx")
    assert _sha256(base_onnx) == before, "the input model.onnx was modified"
    d_bake, _ = diff_stats(ort_logits(baked, ids), peft_plain)
    assert d_bake <= FP32_LOGITS_TOL, f"baked model.onnx vs PEFT unmerged: max|Δ| {d_bake:.3g}"
    print(f"story4: corrupted {hit} moves logits {d_bad:.2g} → exit 1; multi-LoRA none {d_none:.2g} "
          f"chat {d_chat:.2g} rslora {d_rs:.2g}; baked {d_bake:.2g}")
