"""`convert --to onnx --with-past` folders run in onnxruntime-genai itself: `og.Model(folder)` reads the
genai_config.json loraport writes, `og.Tokenizer` the copied tokenizer files, and greedy generation gives the
tokens transformers + PEFT (adapter unmerged) generate; with `--multi-lora`, `og.Adapters` loads each
`.onnx_adapter` and switching between them gives each adapter's own tokens.

The model is a 3-layer Llama built with transformers, the tokenizer a byte-level BPE trained here with
`tokenizers` and saved through PreTrainedTokenizerFast, the adapters PEFT LoRAs with random (non-zero) B."""

from __future__ import annotations

import json

import pytest
import torch

from tests._onnx_util import export_kw, workdir

og = pytest.importorskip("onnxruntime_genai")

PROMPT = "the quick brown fox"
NEW = 6
EOS = 2


def _tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, a tiny tokenizer for tests"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], limit_alphabet=60,
        initial_alphabet=[]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


def _make(family: str = "llama", **extra):
    import peft
    import transformers

    d = workdir(f"genai-{family}")
    base = d / "base"
    ads = [d / "qa", d / "chat"]
    if not (ads[-1] / "adapter_config.json").is_file():
        cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "phi3": "Phi3Config"}[family]
        cfg = getattr(transformers, cls)(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=1, eos_token_id=EOS, pad_token_id=0, **extra)
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(cfg)
        m.save_pretrained(base)
        _tokenizer(base)
        for i, ad in enumerate(ads):
            torch.manual_seed(10 + i)
            pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(
                r=4, lora_alpha=16, target_modules="all-linear",
                init_lora_weights=False))
            pm.save_pretrained(ad)
    return base, ads


def _peft_tokens(base, adapter, prompt_ids: list[int]) -> list[int]:
    """transformers' greedy generate (stops at eos, which is dropped: genai does not return it)."""
    import peft
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        m = peft.PeftModel.from_pretrained(m, adapter)
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=EOS,
                         pad_token_id=0)
    new = out[0, len(prompt_ids):].tolist()
    return new[: new.index(EOS)] if EOS in new else new


def _og_tokens(model, prompt_ids: list[int], adapters=None, name: str | None = None) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + NEW, do_sample=False)
    gen = og.Generator(model, params)
    if name is not None:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens([prompt_ids])
    while not gen.is_done():
        gen.generate_next_token()
    new = [int(t) for t in gen.get_sequence(0)[len(prompt_ids):]]
    return new[: new.index(EOS)] if EOS in new else new


def test_multi_lora_with_past_runs_in_genai_and_switches_adapters():
    base, ads = _make()
    out = export_kw(base, [(a, 1.0) for a in ads], with_past=True, multi_lora=True)
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert (cfg["model"]["type"], dec["num_key_value_heads"], dec["head_size"], dec["num_hidden_layers"]) == \
        ("llama", 2, 8, 3)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    from loraport.manifest import verify

    rep = verify(out)  # the integrity manifest covers genai_config.json and the adapter files too
    assert rep["ok"] and rep["files_checked"] == len(list(p for p in out.rglob("*") if p.is_file())) - 1

    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    ids = [int(t) for t in tok.encode(PROMPT)]
    from transformers import AutoTokenizer

    assert ids == AutoTokenizer.from_pretrained(base)(PROMPT)["input_ids"]  # the copied tokenizer files
    adapters = og.Adapters(model)
    for a in ads:
        adapters.load(str(out / "adapters" / f"{a.name}.onnx_adapter"), a.name)
    want = {None: _peft_tokens(base, None, ids), **{a.name: _peft_tokens(base, a, ids) for a in ads}}
    assert len({tuple(v) for v in want.values()}) == 3 and all(len(v) >= 3 for v in want.values())
    # the base, then each adapter, then back: one model, adapters switched per generator
    for name in ("qa", "chat", None, "qa"):
        assert _og_tokens(model, ids, adapters, name) == want[name], name


@pytest.mark.slow
@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen2", {"use_sliding_window": False}),
                                          ("phi3", {})])
def test_merged_with_past_runs_in_genai(family, extra):
    base, ads = _make(family, **extra)
    out = export_kw(base, [(ads[0], 1.0)], with_past=True)
    model = og.Model(str(out))
    ids = [5, 17, 33, 42, 7]
    want = _peft_tokens(base, ads[0], ids)
    assert len(want) >= 3
    assert _og_tokens(model, ids) == want


def test_no_genai_config_without_past():
    """Without a KV cache onnxruntime-genai cannot generate: no genai_config.json is written."""
    from tests._onnx_util import ADAPTERS, LLAMA

    out = export_kw(LLAMA, [(ADAPTERS / "llama_plain", 1.0)])  # the export other test modules share
    assert (out / "model.onnx").is_file() and not (out / "genai_config.json").exists()


def test_genai_config_sources_and_refusals(tmp_path):
    """Token ids: generation_config.json over config.json, the tokenizer's eos added; an unknown model type
    is genai's generic `decoder`; without any eos the export gets no genai_config.json and says why."""
    import onnx

    from loraport.onnx.genai import write_genai_config

    base, ads = _make()
    proto = onnx.load(str(export_kw(base, [(a, 1.0) for a in ads], with_past=True, multi_lora=True) /
                          "model.onnx"), load_external_data=False)
    cfg = json.loads((base / "config.json").read_text())
    root = tmp_path / "base"
    root.mkdir()
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6], "top_k": 7, "do_sample": True,
                                                             "temperature": "hot"}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / f).write_bytes((base / f).read_bytes())  # eos_token "</s>" = id 2
    out = tmp_path / "out"
    out.mkdir()
    name, why = write_genai_config(out, proto, {**cfg, "model_type": "my_llama"}, root, "model.onnx")
    got = json.loads((out / name).read_text())
    assert why is None and got["model"]["type"] == "decoder"
    assert (got["model"]["eos_token_id"], got["model"]["bos_token_id"], got["model"]["pad_token_id"]) == \
        ([2, 5, 6], 1, 0)
    assert (got["search"]["top_k"], got["search"]["do_sample"], got["search"]["temperature"]) == (7, True, 1.0)
    assert got["model"]["context_length"] == got["search"]["max_length"] == 64

    (root / "generation_config.json").unlink()
    (root / "tokenizer_config.json").unlink()
    (out / name).unlink()
    name, why = write_genai_config(out, proto, {k: v for k, v in cfg.items() if k != "eos_token_id"}, root,
                                   "model.onnx")
    assert name is None and "eos_token_id" in why and not any(out.iterdir())
