"""llama.cpp as the consumer of loraport's GGUF adapters: logits parity with the PEFT-merged model.

For each architecture: a tiny random transformers model with a hand-built Llama-style tokenizer, a PEFT LoRA
on it, the base converted to GGUF by llama.cpp's own convert_hf_to_gguf.py (f32), the adapter converted by
`loraport convert --to gguf`; llama-cpp-python then runs the base with the adapter (`lora_path=`) on fixed
token ids, and its logits are compared with PEFT's merged model's (fp32, transformers) on the same ids.

    LORAPORT_LLAMACPP=/path/to/llama.cpp python bench/gguf_llamacpp_parity.py [--arch llama gemma2 ...]

Needs llama-cpp-python (the wheel) and a llama.cpp tree (the sdist's vendor/llama.cpp) for the base converter,
which imports sentencepiece (LORAPORT_LLAMACPP_PYTHONPATH: extra import path for the converter only).
Prints max |Δlogit| per architecture, with the logits' scale, and the same without the adapter (what a
missing or misnamed adapter would look like). Exits 1 past --tol.
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

TOKENS = [1, 40, 77, 120, 9, 200, 33, 5, 150, 61, 250, 7]


def _tokenizer(base: Path, vocab_size: int) -> None:
    """A Llama-2-style byte-fallback BPE tokenizer (what convert_hf_to_gguf's LlamaHfVocab accepts)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        if len(vocab) < vocab_size:
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 64}))


def _build(arch: str, tmp: Path) -> tuple[Path, Path]:
    import _gguf_arch_util as u

    cls, over, targets = u.ARCHS[arch]
    over = {**over, "vocab_size": 288, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    u.ARCHS[arch] = (cls, over, targets)
    base, adapter = u.build(arch, tmp)
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


def _llamacpp_logits(base_gguf: Path, lora: Path | None) -> torch.Tensor:
    from llama_cpp import Llama

    kw = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(base_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0, **kw)
    llm.eval(TOKENS)
    out = torch.tensor(llm.scores[: len(TOKENS)]).float()
    llm.close()
    return out


def run(arch: str, llamacpp: Path, tmp: Path) -> tuple[float, float, float]:
    from loraport.api import convert

    base, adapter = _build(arch, tmp)
    base_gguf = tmp / f"{arch}-base.gguf"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if os.environ.get("LORAPORT_LLAMACPP_PYTHONPATH"):  # e.g. where sentencepiece is, which the converter imports
        env["PYTHONPATH"] = os.environ["LORAPORT_LLAMACPP_PYTHONPATH"]
    p = subprocess.run([sys.executable, str(llamacpp / "convert_hf_to_gguf.py"), str(base), "--outtype", "f32",
                        "--outfile", str(base_gguf)], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{arch}: convert_hf_to_gguf.py failed:\n{p.stderr[-3000:]}")
    lora = tmp / f"{arch}-lora.gguf"
    convert(adapter, "gguf", lora, base=base)
    want, plain = _peft_logits(base, adapter)
    got = _llamacpp_logits(base_gguf, lora)
    without = _llamacpp_logits(base_gguf, None)
    return float((got - want).abs().max()), float((without - want).abs().max()), float(want.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    # llama only by default: the other families' base converters need their real tokenizers (sentencepiece
    # models or a pre-tokenizer llama.cpp recognises), which a tiny offline model cannot have
    ap.add_argument("--arch", nargs="*", default=["llama"])
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    llamacpp = Path(os.environ.get("LORAPORT_LLAMACPP", ""))
    if not (llamacpp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit("set LORAPORT_LLAMACPP to a llama.cpp tree (convert_hf_to_gguf.py)")
    bad = False
    print(f"{'arch':<14}{'max|Δ| with adapter':>22}{'without adapter':>18}{'max|logit|':>12}")
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            d, d0, scale = run(arch, llamacpp, Path(tmp))
        bad |= d > args.tol
        print(f"{arch:<14}{d:>22.2e}{d0:>18.2e}{scale:>12.3f}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
