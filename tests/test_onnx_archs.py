"""Merged ONNX export of each tested family (built locally from tiny configs, adapters made by PEFT) vs PEFT
unmerged in onnxruntime. Slow: one trace per family."""

from __future__ import annotations

import pytest
import torch

from tests._onnx_util import export_kw, feeds, max_abs, ort_run, peft_logits, workdir

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=False, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
}


def _make(family: str):
    import peft
    import transformers

    d = workdir(f"arch-{family}")
    base, ad = d / "base", d / "lora"
    if not (ad / "adapter_config.json").is_file():
        cls, extra = FAMILIES[family]
        cfg = getattr(transformers, cls)(**COMMON, **extra)
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(cfg)
        m.save_pretrained(base)
        pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False))
        pm.save_pretrained(ad)
    return base, ad


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_merged_export_matches_peft(family):
    base, ad = _make(family)
    out = export_kw(base, [(ad, 1.0)])
    f = feeds(2, 9, seed=7)
    ref = peft_logits(base, ad, f)
    assert max_abs(ref, peft_logits(base, None, f)) > 1e-3
    assert max_abs(ort_run(out / "model.onnx", f), ref) <= 1e-4


@pytest.mark.slow
def test_qwen2_tied_multi_lora():
    base, ad = _make("qwen2")
    out = export_kw(base, [(ad, 1.0)], multi_lora=True)
    f = feeds(2, 9, seed=8)
    assert max_abs(ort_run(out / "model.onnx", f), peft_logits(base, None, f)) <= 1e-5
    got = ort_run(out / "model.onnx", f, out / "adapters" / "lora.onnx_adapter")
    assert max_abs(got, peft_logits(base, ad, f)) <= 1e-4
