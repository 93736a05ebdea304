"""llama.cpp as the consumer of loraport's GGUF adapters: logits parity with the PEFT-merged model.

For each family: a tiny random transformers model (vocab 288) with a sentencepiece tokenizer trained here
offline, a PEFT LoRA on it (r=4, alpha=8, every attention and MLP projection), the base converted to GGUF by
llama.cpp's own convert_hf_to_gguf.py (f32), the adapter by `loraport convert --to gguf`; llama-cpp-python then
runs the base with the adapter (`lora_path=`, f32 KV cache) on 12 fixed token ids, and its logits are compared
with PEFT's merged model's (fp32 transformers) on the same ids.

    LORAPORT_LLAMACPP=/path/to/llama.cpp LORAPORT_LLAMACPP_PYTHONPATH=/where/sentencepiece/is \
        python bench/gguf_llamacpp_parity.py [--arch llama qwen2 ...] [--tol X]

Needs llama-cpp-python and a llama.cpp tree (e.g. the llama-cpp-python sdist's vendor/llama.cpp) for the base
converter, which imports sentencepiece (LORAPORT_LLAMACPP_PYTHONPATH: an extra import path for it). Families:
llama, granite, smollm3 (q/k rows permuted by the converter), qwen2, phi3 (fused qkv and gate_up), gemma2,
gemma3; the others in tests/_gguf_arch_util.py need a BPE tokenizer whose pre-tokenizer hash llama.cpp knows.
Prints per family max |Δlogit| with the adapter, and the controls: without it (what a dropped or misnamed
adapter looks like) and at lora_scale 0.5 (what a wrong alpha/r rule looks like); then llama.cpp's base alone
against transformers' base, and the logits' scale. Exits 1 when a family is past its tolerance (TOL, reasons
beside it) or a control is not 100x past it. The same run as a slow test:
tests/test_gguf_llamacpp_parity.py. Result: bench/results/gguf-llamacpp-parity-2026-12-05.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _gguf_arch_util import llamacpp_env, llamacpp_tree  # noqa: E402

TOKENS = [1, 40, 77, 120, 9, 200, 33, 5, 150, 61, 250, 7]
# max |Δlogit| allowed per family. Everything runs in f32 (weights, adapter, KV cache forced to f32: llama.cpp's
# default f16 cache alone costs ~2e-4 here): f32 rounding (eps 1.2e-7) on logits of scale ~0.5 summed over
# 32-48-term dot products through 2 layers stays near 1e-6, so 1e-5 leaves 10x margin. Gemma 2's GELU runs on
# ggml's CPU f16 lookup table (GGML_GELU_FP16: the input is rounded to f16, rel. 4.9e-4), which the base alone
# shows at ~1e-4 ('base only' column), hence 5e-4 there
TOL = {"llama": 1e-5, "granite": 1e-5, "smollm3": 1e-5, "qwen2": 1e-5, "phi3": 1e-5, "gemma2": 5e-4,
       "gemma3": 5e-4}


def _tokenizer(base: Path, vocab_size: int) -> None:
    """A sentencepiece BPE model with byte fallback, trained here on random words: every family the bench runs
    has a converter that reads `tokenizer.model` first (LlamaModel, Qwen2Model, Gemma2Model), and pads the vocab
    to the config's vocab_size ([PAD] tokens), which llama.cpp sizes token_embd by. sentencepiece is imported
    from LORAPORT_LLAMACPP_PYTHONPATH when it is not installed."""
    import io
    import random

    extra = os.environ.get("LORAPORT_LLAMACPP_PYTHONPATH")
    if extra and extra not in sys.path:
        sys.path.append(extra)
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6))) for _ in range(200)]
    text = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   # llama.cpp's vocab loader looks it up (.at) when the model's name says phi3
                                   user_defined_symbols=["<|endoftext|>"])
    (base / "tokenizer.model").write_bytes(buf.getvalue())
    (base / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 64}))


# bench-only families and overrides on top of tests/_gguf_arch_util.ARCHS. Gemma 2's converter drops lm_head
# (llama.cpp always reads the output through token_embd), so its base must tie them, and llama.cpp scales its
# queries by 1/sqrt(head_dim) whatever query_pre_attn_scalar says (true of the released 2B/9B: 256 = head_dim)
_EXTRA = {"qwen2": ("Qwen2Config", dict(intermediate_size=48), ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])}
_OVER = {g: dict(tie_word_embeddings=True, query_pre_attn_scalar=8) for g in ("gemma2", "gemma3")}


def _build(arch: str, tmp: Path) -> tuple[Path, Path]:
    import _gguf_arch_util as u

    cls, over, targets = _EXTRA.get(arch) or u.ARCHS[arch]
    over = {**over, **_OVER.get(arch, {}), "vocab_size": 288, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0}
    saved = u.ARCHS.get(arch)
    u.ARCHS[arch] = (cls, over, targets)  # for this build only: the tests share the table
    try:
        base, adapter = u.build(arch, tmp)
    finally:
        if saved is None:
            del u.ARCHS[arch]
        else:
            u.ARCHS[arch] = saved
    _tokenizer(base, 288)
    return base, adapter


def _peft_logits(base: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([TOKENS])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(ids).logits[0].float()
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
        return merged(ids).logits[0].float(), plain


def _llamacpp_logits(base_gguf: Path, lora: Path | None, scale: float = 1.0) -> torch.Tensor:
    from llama_cpp import Llama

    kw = {"lora_path": str(lora), "lora_scale": scale} if lora else {}
    # type_k/type_v 0 = GGML_TYPE_F32: an f32 KV cache (the default f16 one rounds keys and values)
    llm = Llama(model_path=str(base_gguf), n_ctx=64, logits_all=True, n_threads=2, seed=0, type_k=0, type_v=0,
                verbose=bool(os.environ.get("LORAPORT_LLAMACPP_VERBOSE")), **kw)
    llm.eval(TOKENS)
    out = torch.tensor(llm.scores[: len(TOKENS)]).float()
    llm.close()
    return out


def run(arch: str, llamacpp: Path, tmp: Path) -> dict[str, float]:
    from loraport.api import convert

    base, adapter = _build(arch, tmp)
    base_gguf = tmp / f"{arch}-base.gguf"
    p = subprocess.run([sys.executable, str(llamacpp / "convert_hf_to_gguf.py"), str(base), "--outtype", "f32",
                        "--outfile", str(base_gguf)], capture_output=True, text=True, env=llamacpp_env())
    if p.returncode:
        raise SystemExit(f"{arch}: convert_hf_to_gguf.py failed:\n{p.stderr[-3000:]}")
    lora = tmp / f"{arch}-lora.gguf"
    convert(adapter, "gguf", lora, base=base)
    want, plain = _peft_logits(base, adapter)
    got = _llamacpp_logits(base_gguf, lora)
    without = _llamacpp_logits(base_gguf, None)
    half = _llamacpp_logits(base_gguf, lora, 0.5)  # a wrong alpha/r rule would look like this
    return {"with": float((got - want).abs().max()), "without": float((without - want).abs().max()),
            "half": float((half - want).abs().max()),
            "base": float((without - plain).abs().max()), "scale": float(want.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    # families whose converter takes a tokenizer.model we can train offline, one permuted (llama) and two not
    ap.add_argument("--arch", nargs="*", default=list(TOL))
    ap.add_argument("--tol", type=float, default=None, help="override the per-family tolerance")
    args = ap.parse_args()
    llamacpp = llamacpp_tree()
    if llamacpp is None:
        raise SystemExit("set LORAPORT_LLAMACPP to a llama.cpp tree (convert_hf_to_gguf.py)")
    bad = []
    print(f"{'arch':<10}{'with adapter':>14}{'without':>10}{'at 0.5x':>10}{'base only':>11}{'max|logit|':>12}"
          f"{'tol':>9}")
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(arch, llamacpp, Path(tmp))
        tol = args.tol or TOL.get(arch, 1e-5)
        # the adapter must be applied (within tol) and its absence must show (the control fails by far)
        if r["with"] > tol or min(r["without"], r["half"]) < 100 * tol:
            bad.append(arch)
        print(f"{arch:<10}{r['with']:>14.2e}{r['without']:>10.2e}{r['half']:>10.2e}{r['base']:>11.2e}"
              f"{r['scale']:>12.3f}{tol:>9.0e}", flush=True)
    print("max |Δlogit| against PEFT's merged model (fp32 transformers), 12 positions x 288 logits; 'without' /"
          " 'at 0.5x': llama.cpp with no adapter / lora_scale 0.5 (the controls); 'base only': llama.cpp without"
          " adapter against the unmerged base")
    if bad:
        print("FAILED: " + " ".join(bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
