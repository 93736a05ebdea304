"""A LoRA merged into a GGUF base by loraport, run by llama.cpp: logits against the unmerged base + adapter in
llama.cpp, against PEFT's merged model, with the file's types and metadata checked (issue #19).

A tiny random Llama (hidden 256, so every 2-D weight's rows are whole k-quant super-blocks; 2 layers, vocab 288
with a sentencepiece tokenizer trained offline) and a PEFT LoRA (r=4, alpha=8, every attention and MLP
projection, random B). The base is converted by llama.cpp's own convert_hf_to_gguf.py to F32, F16 and Q8_0,
and quantized by llama.cpp's own quantizer (llama_cpp.llama_model_quantize, what llama-quantize runs) from the
F32 file to Q4_0 and Q4_K_M (Q4_K with Q6_K for attn_v / half of ffn_down / the head). Per type:

  merged   `loraport merge --base base-T.gguf --adapter peft` run in llama-cpp-python (f32 KV cache)
  lora     base-T.gguf + `loraport convert --to gguf` of the adapter as `lora_path` (llama.cpp applies it unmerged)
  peft     PEFT's merge_and_unload of the transformers model (fp32)
  quant    the type's own error, the larger of: llama.cpp's base-T against its base-F32 (no adapter), and
           llama.cpp's own type-T file of PEFT's merged model (convert_hf_to_gguf / llama_model_quantize of the
           merged HF model, what "merge in full precision, then quantize" gives) against PEFT's merged model

Checks (exit 1 on any failure), on |Δlogit| over the 12 x 288 logits: |merged − lora| and |merged − peft|
within 2x the type's RMS error and 3x its max error (floor 1e-5, the f32 rounding level, see
gguf_llamacpp_parity.py). Why these factors: the merged file carries two roundings — the base's own, and the
re-rounding of the merged weights onto the type's grid, whose block scales grow with the delta (llama.cpp's
own type-T file of the merged model measures that one) — so about sqrt(2)x one rounding in RMS; the max over
3456 logits is noisier than the RMS (the first run, with a 2x max bound, had Q8_0 at 2.1x: double rounding,
with the codes bit-exact). Control: the adapter's own effect (RMS |merged − base-T|) ≥ 2x the RMS tolerance, so
a dropped adapter fails. Files: every tensor keeps its name, shape and
type (an updated k-quant: its `loraport.quant.ggml.FALLBACK` type until loraport writes k-quants) and every
metadata key its value (gguf.GGUFReader); the re-quantized codes equal `gguf.quants.quantize` of the base's
dequantized weights + PEFT's ΔW on ≥ 99.5 % of the bytes (PEFT sums B·A·s in another order: a code may flip at
a rounding boundary), for every type gguf.quants can quantize.

    LORAPORT_LLAMACPP=/path/to/llama.cpp LORAPORT_LLAMACPP_PYTHONPATH=/where/sentencepiece/is \
        python bench/gguf_merged_llamacpp.py [--types F32 Q4_0 ...]

The same run as a slow test: tests/test_gguf_merged_llamacpp.py. Result: bench/results/gguf-merged-llamacpp-*.txt
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _gguf_arch_util import bench_script, llamacpp_env, llamacpp_tree  # noqa: E402

TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"]
CONVERTED = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0"}  # convert_hf_to_gguf --outtype
QUANTIZED = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # llama_model_quantize
FLOOR = 1e-5
# tolerances, in units of the type's own error `quant` (see the module docstring); CONTROL: the adapter's effect
# must exceed the RMS tolerance by this much, so a dropped adapter fails
RMS_FACTOR, MAX_FACTOR, CONTROL = 2.0, 3.0, 2.0


P = bench_script("gguf_llamacpp_parity")  # its tokenizer and llama.cpp / PEFT runners


def build(tmp: Path) -> tuple[Path, Path]:
    """The tiny Llama (a tokenizer.model beside it) and a PEFT LoRA on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    cfg = LlamaConfig(vocab_size=288, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    base, adapter = tmp / "hf", tmp / "lora"
    model.save_pretrained(base)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    lora.save_pretrained(adapter)
    P._tokenizer(base, 288)
    return base, adapter


def make_bases(hf: Path, llamacpp: Path, tmp: Path, types: list[str], stem: str = "base") -> dict[str, Path]:
    """<stem>-T.gguf for each type: llama.cpp's converter, then llama.cpp's quantizer from the F32 file."""
    import llama_cpp

    env = llamacpp_env()
    out = {}
    for t in ["F32", *[t for t in types if t in CONVERTED and t != "F32"]]:
        out[t] = tmp / f"{stem}-{t}.gguf"
        p = subprocess.run([sys.executable, str(llamacpp / "convert_hf_to_gguf.py"), str(hf), "--outtype",
                            CONVERTED[t], "--outfile", str(out[t])], capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(f"convert_hf_to_gguf.py --outtype {CONVERTED[t]} failed:\n{p.stderr[-3000:]}")
    for t in (t for t in types if t in QUANTIZED):
        out[t] = tmp / f"{stem}-{t}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANTIZED[t])
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(out["F32"]).encode(), str(out[t]).encode(), params)
        if rc:
            raise SystemExit(f"llama_model_quantize to {t} failed ({rc})")
    return out


def _meta(r) -> dict:
    return {k: (f.types, f.contents()) for k, f in r.fields.items()
            if not k.startswith(("GGUF.", "loraport."))}


def file_checks(base: Path, merged: Path, peft_delta: dict[str, torch.Tensor], heads: tuple[int, int]) -> dict:
    """Types, shapes, metadata and codes of `merged` against `base` (see the module docstring)."""
    import _libggml
    import gguf
    from _gguf_base_util import gguf_name, llama_permute

    from loraport.quant import ggml

    rb, rm = gguf.GGUFReader(base), gguf.GGUFReader(merged)
    tb, tm = list(rb.tensors), list(rm.tensors)
    layout_ok = [(t.name, list(t.shape)) for t in tb] == [(t.name, list(t.shape)) for t in tm]
    want_type = {t.name: ggml.writable(ggml.BY_NAME[t.tensor_type.name]).name for t in tb}
    delta = {gguf_name(k): (k, d) for k, d in peft_delta.items()}
    kept = fell_back = wrong = checked = 0
    worst = 1.0
    for b, m in zip(tb, tm):
        updated = b.name in delta
        if m.tensor_type.name != (want_type[b.name] if updated else b.tensor_type.name):
            wrong += 1
        kept += m.tensor_type == b.tensor_type
        fell_back += m.tensor_type != b.tensor_type
        if not updated:
            wrong += not np.array_equal(b.data, m.data)
            continue
        hf, d = delta[b.name]
        shape = tuple(int(x) for x in reversed(b.shape))
        d = d.numpy()
        if hf.endswith(("q_proj.weight", "k_proj.weight")):
            d = llama_permute(d, heads[0] if "q_proj" in hf else heads[1])
        w = gguf.quants.dequantize(b.data, b.tensor_type).astype(np.float32).reshape(shape) + d
        try:
            want = gguf.quants.quantize(np.ascontiguousarray(w), m.tensor_type)
        except NotImplementedError:  # a k-quant: gguf-py has no quantizer for it, libggml's own is the reference
            lib = _libggml.load()
            if lib is None or m.tensor_type.name not in _libggml.IDS:
                continue
            want = lib.quantize(w.reshape(-1, shape[-1]), m.tensor_type.name)
        checked += 1
        worst = min(worst, float(np.mean(want.reshape(-1).view(np.uint8) == m.data.reshape(-1).view(np.uint8))))
    types = sorted({f"{b.tensor_type.name}->{m.tensor_type.name}" for b, m in zip(tb, tm) if b.name in delta})
    return {"layout": layout_ok, "metadata": _meta(rb) == _meta(rm), "wrong_tensors": wrong, "kept": kept,
            "fell_back": fell_back, "codes_checked": checked, "codes_equal_min": worst, "updated": types}


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def _amax(x: torch.Tensor) -> float:
    return float(x.abs().max())


def run(llamacpp: Path, tmp: Path, types: list[str] = TYPES) -> dict[str, dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraport.api import convert, merge

    hf, adapter = build(tmp)
    bases = make_bases(hf, llamacpp, tmp, types)
    lora = tmp / "lora.gguf"
    convert(adapter, "gguf", lora, base=hf)
    want, plain = P._peft_logits(hf, adapter)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    after = peft_merged.state_dict()
    delta = {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}
    heads = (model.config.num_attention_heads, model.config.num_key_value_heads)
    peft_merged.save_pretrained(tmp / "hf-merged")  # llama.cpp's own type-T file of PEFT's merge: the reference
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(hf / f, tmp / "hf-merged" / f)
    refs = make_bases(tmp / "hf-merged", llamacpp, tmp, types, stem="peft-merged")
    f32 = P._llamacpp_logits(bases["F32"], None)
    rows = {}
    for t in types:
        merged = tmp / f"merged-{t}.gguf"
        merge(bases[t], [str(adapter)], merged)
        m, a = P._llamacpp_logits(merged, None), P._llamacpp_logits(bases[t], lora)
        b, r = P._llamacpp_logits(bases[t], None), P._llamacpp_logits(refs[t], None)
        diffs = {"merged_vs_lora": m - a, "merged_vs_peft": m - want, "lora_vs_peft": a - want,
                 "base_quant": b - f32, "ref_quant": r - want, "effect": m - b}
        row = {k: (_rms(d), _amax(d)) for k, d in diffs.items()}
        quant = (max(row["base_quant"][0], row["ref_quant"][0]), max(row["base_quant"][1], row["ref_quant"][1]))
        rows[t] = {**row, "quant": quant, "tol": (max(RMS_FACTOR * quant[0], FLOOR), max(MAX_FACTOR * quant[1], FLOOR)),
                   "scale": _amax(want), **file_checks(bases[t], merged, delta, heads)}
    rows["F32"]["base_vs_transformers"] = _amax(f32 - plain)
    return rows


def failures(r: dict) -> list[str]:
    tol = r["tol"]
    bad = [f"{k} {n}" for k in ("merged_vs_lora", "merged_vs_peft") for i, n in enumerate(("rms", "max"))
           if r[k][i] > tol[i]]
    bad += ["effect (control)"] if r["effect"][0] < CONTROL * tol[0] else []
    bad += [k for k in ("layout", "metadata") if not r[k]]
    bad += ["types/bytes"] if r["wrong_tensors"] else []
    bad += ["codes"] if r["codes_checked"] and r["codes_equal_min"] < 0.995 else []
    return bad


def _fmt(x: tuple[float, float]) -> str:
    return f"{x[0]:.2e} ({x[1]:.1e})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="*", default=TYPES, choices=TYPES)
    args = ap.parse_args()
    llamacpp = llamacpp_tree()
    if llamacpp is None:
        raise SystemExit("set LORAPORT_LLAMACPP to a llama.cpp tree (convert_hf_to_gguf.py)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(llamacpp, Path(tmp), ["F32", *[t for t in args.types if t != "F32"]])
    cols = ["merged-lora", "merged-peft", "lora-peft", "quant", "tol", "effect"]
    print(f"{'type':<8}" + "".join(f"{c:>20}" for c in cols) + f"  {'kept/fallback':>13}  {'codes':>13}  "
          "updated (base->written)")
    bad = []
    for t, r in rows.items():
        f = failures(r)
        bad += [f"{t}: {', '.join(f)}"] if f else []
        print(f"{t:<8}" + "".join(f"{_fmt(r[k]):>20}" for k in ("merged_vs_lora", "merged_vs_peft", "lora_vs_peft",
                                                                 "quant", "tol", "effect"))
              + f"  {r['kept']:>6}/{r['fell_back']:<6}  {r['codes_equal_min']:>7.4f} ({r['codes_checked']:>2})  "
              + " ".join(r["updated"]), flush=True)
    print(f"RMS (max) |Δlogit| over 12 positions x 288 logits (max |logit| {rows['F32']['scale']:.3f}); quant: "
          "the type's own error, the larger of llama.cpp's base-T vs its base-F32 and llama.cpp's type-T file "
          f"of PEFT's merge vs PEFT; tol = {RMS_FACTOR:g}x quant RMS, {MAX_FACTOR:g}x quant max (floor 1e-5); "
          f"effect: merged vs base-T, the adapter's own effect (control: RMS >= {CONTROL:g}x tol); kept/fallback: "
          "tensors whose ggml type is unchanged / updated k-quants written in their fallback type; codes: min "
          "fraction of bytes equal to gguf.quants.quantize(base + PEFT dW) over (n) updated tensors; metadata "
          "and layout equal: " + ", ".join(f"{t} {r['layout'] and r['metadata']}" for t, r in rows.items()))
    print(f"llama.cpp F32 base vs transformers base: max {rows['F32']['base_vs_transformers']:.2e}")
    if bad:
        print("FAILED: " + "; ".join(bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
