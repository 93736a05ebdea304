"""Adapters trained with added tokens (issue #18): a vocabulary resized before training, `modules_to_save` copies
of the embedding and head, PEFT TrainableTokens (`trainable_token_indices`) and tied embeddings.

Every case is made here by the real producers on tiny transformers models: a local WordLevel tokenizer gains chat
and tool tokens, the model is resized (`resize_token_embeddings`), PEFT trains (perturbs) the adapter and saves
it with the tokenizer. Oracles, all live: the adapted model (PeftModel on the resized base) and PEFT's
`merge_and_unload()`. The merged folder must hold PEFT's tensors within 1e-5 (fp32), load with `from_pretrained`
and, with the adapter's tokenizer, give the adapted model's logits on text with the new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _peft_util import build_tokenizer, cli, llama_config, load_state, max_abs, qwen2_config

pytest.importorskip("peft")
pytest.importorskip("transformers")

TOL = 1e-5
NEW = ["<tool>", "</tool>", "<|im_start|>", "<|im_end|>"]
TEXT = "<|im_start|> w5 w9 <tool> w17 </tool> w33 <|im_end|>"
TEMPLATE = "{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}"


def _make(root: Path, name: str, arch: str, peft_kwargs: dict, resize: bool = True) -> dict:
    """Base folder (+ tokenizer), adapter folder (+ the grown tokenizer), the adapted model's logits on TEXT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(hash(name) % 1000)
    cls, cfg = (LlamaForCausalLM, llama_config()) if arch == "llama" else (Qwen2ForCausalLM, qwen2_config("float32"))
    base_dir = root / f"base_{arch}"
    if not base_dir.exists():
        cls(cfg).save_pretrained(base_dir)
        build_tokenizer().save_pretrained(base_dir)
    tok = build_tokenizer()
    model = cls.from_pretrained(base_dir).eval()
    if resize:
        tok.add_special_tokens({"additional_special_tokens": NEW})
        tok.chat_template = TEMPLATE
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **peft_kwargs))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # "training": every trainable tensor moves (tied copies stay tied if PEFT ties them)
                p.add_(torch.randn_like(p) * 0.2)
    ad = root / name
    pm.save_pretrained(ad)
    tok.save_pretrained(ad)
    ids = tok(TEXT, return_tensors="pt").input_ids if resize else torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        adapted = pm(ids).logits
    return {"base": base_dir, "adapter": ad, "ids": ids, "adapted": adapted, "arch": arch, "cls": cls}


def _peft_merge(case: dict) -> dict[str, torch.Tensor]:
    """PEFT's merge of the saved adapter into the freshly loaded (and resized) base."""
    from peft import PeftModel
    from transformers import PreTrainedTokenizerFast

    model = case["cls"].from_pretrained(case["base"]).eval()
    n = len(PreTrainedTokenizerFast.from_pretrained(case.get("tokenizer", case["adapter"])))
    if n != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(n, mean_resizing=False)
    merged = PeftModel.from_pretrained(model, str(case["adapter"])).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _merge(case: dict, out: Path, *extra) -> dict:
    res = cli("merge", "--base", case["base"], "--adapter", case["adapter"], "--out", out, "--json", *extra)
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.stderr}\n{res.exception!r}"
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("tokens")
    both = {"modules_to_save": ["embed_tokens", "lm_head"]}
    new_ids = list(range(128, 128 + len(NEW)))
    return {
        "llama_mts": _make(root, "llama_mts", "llama", both),
        "llama_tokens": _make(root, "llama_tokens", "llama", {"trainable_token_indices": {"embed_tokens": new_ids}}),
        "qwen_mts": _make(root, "qwen_mts", "qwen", both),
        "qwen_tokens": _make(root, "qwen_tokens", "qwen", {"trainable_token_indices": new_ids}),
        "qwen_head": _make(root, "qwen_head", "qwen", {"modules_to_save": ["lm_head"]}, resize=False),
        "llama_tokens_noresize": _make(root, "llama_tokens_noresize", "llama",
                                       {"trainable_token_indices": [5, 9, 17]}, resize=False),
    }


def _logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits


@pytest.mark.parametrize("name", ["llama_mts", "llama_tokens", "qwen_tokens", "llama_tokens_noresize"])
def test_merge_equals_peft_and_the_adapted_model(name, cases, tmp_path):
    """Untied bases, and a tied base whose head and embedding got the same trained rows: PEFT's tensors, the
    adapter's vocabulary size and tokenizer, the adapted model's logits from `from_pretrained`."""
    from transformers import PreTrainedTokenizerFast as Tok  # AutoTokenizer would pick Qwen2's class by model_type

    case = cases[name]
    out = tmp_path / "merged"
    rep = _merge(case, out)
    got, want = load_state(out), _peft_merge(case)
    tied = case["arch"] == "qwen"
    assert set(got) == set(want) - ({"lm_head.weight"} if tied else set())
    for k, t in got.items():
        assert t.shape == want[k].shape, k
        assert max_abs(t, want[k]) <= TOL, f"{k}: {max_abs(t, want[k]):.3g}"
    cfg = json.loads((out / "config.json").read_text())
    rows = got["model.embed_tokens.weight"].shape[0]
    assert cfg["vocab_size"] == rows == len(Tok.from_pretrained(out))
    assert cfg.get("tie_word_embeddings", False) == tied and not rep["warnings"]
    tok = Tok.from_pretrained(out)
    ids = tok(TEXT, return_tensors="pt").input_ids if rows > 128 else case["ids"]
    assert torch.equal(ids, case["ids"])  # the new tokens are single ids of the adapter's tokenizer
    assert max_abs(_logits(out, ids), case["adapted"]) <= 1e-4
    if rows > 128:
        assert tok.chat_template == TEMPLATE


def test_tied_base_trained_apart_is_untied(cases, tmp_path):
    """modules_to_save trained separate copies of a tied Qwen2 head and embedding: auto unties (config and a
    warning say so) and gives the adapted model's logits and PEFT's in-memory tensors; keep is refused."""
    case = cases["qwen_mts"]
    out = tmp_path / "merged"
    rep = _merge(case, out)
    assert any("untied lm_head.weight" in w for w in rep["warnings"])
    got, want = load_state(out), _peft_merge(case)
    assert max_abs(got["lm_head.weight"], want["lm_head.weight"]) <= TOL
    assert max_abs(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"]) <= TOL
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert max_abs(_logits(out, case["ids"]), case["adapted"]) <= 1e-4
    # validate builds its reference the same way (untied, resized); another adapter's reference fails it
    assert cli("validate", out, "--base", case["base"], "--adapter", case["adapter"]).exit_code == 0
    assert cli("validate", out, "--base", case["base"], "--adapter", cases["qwen_tokens"]["adapter"]).exit_code == 1
    res = cli("merge", "--base", case["base"], "--adapter", case["adapter"], "--out", tmp_path / "k",
              "--tie-embeddings", "keep")
    assert res.exit_code == 2 and "apart" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "k").exists()


def test_tie_options_on_a_head_only_adapter(cases, tmp_path):
    """Only the tied head trained: auto and untie write it apart (adapted logits); keep writes one shared tensor
    (PEFT's merge then save_pretrained: the tie carries the head into the embedding)."""
    case = cases["qwen_head"]
    for mode in ("auto", "untie"):
        out = tmp_path / mode
        rep = _merge(case, out, "--tie-embeddings", mode)
        assert "lm_head.weight" in load_state(out) and rep["warnings"]
        assert max_abs(_logits(out, case["ids"]), case["adapted"]) <= 1e-4
    out = tmp_path / "keep"
    _merge(case, out, "--tie-embeddings", "keep")
    got = load_state(out)
    assert "lm_head.weight" not in got
    assert max_abs(got["model.embed_tokens.weight"], _peft_merge(case)["lm_head.weight"]) <= TOL


def test_untie_keeps_an_exact_tie_apart_on_request(cases, tmp_path):
    case = cases["qwen_tokens"]
    out = tmp_path / "u"
    _merge(case, out, "--tie-embeddings", "untie")
    got = load_state(out)
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert max_abs(_logits(out, case["ids"]), case["adapted"]) <= 1e-4


def _copy_adapter(case: dict, dst: Path) -> Path:
    import shutil

    shutil.copytree(case["adapter"], dst)
    return dst


def test_refusals(cases, tmp_path):
    """Bad inputs: exit 2, one line, nothing written, inputs unchanged."""
    from safetensors.torch import load_file, save_file

    llama = cases["llama_mts"]
    # a weight other than 1 on an adapter that resizes the vocabulary
    res = cli("merge", "--base", llama["base"], "--adapter", llama["adapter"], "--weight", "0.5",
              "--out", tmp_path / "w")
    assert res.exit_code == 2 and "weight 1" in res.stderr and not (tmp_path / "w").exists()
    # the two trained spellings of a modules_to_save module disagree
    bad = _copy_adapter(llama, tmp_path / "two_copies")
    sd = load_file(bad / "adapter_model.safetensors")
    k = "base_model.model.lm_head.modules_to_save.weight"
    sd[k] = sd[k] + 1
    save_file(sd, bad / "adapter_model.safetensors", {"format": "pt"})
    res = cli("merge", "--base", llama["base"], "--adapter", bad, "--out", tmp_path / "o1")
    assert res.exit_code == 2 and "differ" in res.stderr and not (tmp_path / "o1").exists()
    # trainable tokens without their indices
    bad = _copy_adapter(cases["llama_tokens"], tmp_path / "no_idx")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = None
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    res = cli("merge", "--base", llama["base"], "--adapter", bad, "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "trainable_token_indices" in res.stderr and not (tmp_path / "o2").exists()
    # only the embedding resized: the merged model could not load
    bad = _copy_adapter(llama, tmp_path / "half")
    sd = load_file(bad / "adapter_model.safetensors")
    for key in [x for x in sd if x.startswith("base_model.model.lm_head.")]:
        sd[key] = sd[key][:128].contiguous()
    save_file(sd, bad / "adapter_model.safetensors", {"format": "pt"})
    res = cli("merge", "--base", llama["base"], "--adapter", bad, "--out", tmp_path / "o3")
    assert res.exit_code == 2 and "could not load" in res.stderr and not (tmp_path / "o3").exists()
    # trained on the resized vocabulary, saved without the embeddings: the tokenizer has ids the output lacks
    bad = _copy_adapter(llama, tmp_path / "no_emb")
    sd = load_file(bad / "adapter_model.safetensors")
    save_file({k: v for k, v in sd.items() if "lora_" in k}, bad / "adapter_model.safetensors", {"format": "pt"})
    res = cli("merge", "--base", llama["base"], "--adapter", bad, "--out", tmp_path / "o4")
    assert res.exit_code == 2 and "save_embedding_layers=True" in res.stderr and not (tmp_path / "o4").exists()
    assert "Traceback" not in res.stderr


def test_convert_to_peft_keeps_trainable_tokens(cases, tmp_path):
    """`convert --to peft` writes trainable tokens as PEFT does: PEFT loads the copy and merges it to the same
    tensors as the original."""
    case = cases["llama_tokens_noresize"]
    out = tmp_path / "copy"
    res = cli("convert", case["adapter"], "--to", "peft", "--out", out)
    assert res.exit_code == 0, res.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"embed_tokens": [5, 9, 17]}
    want = _peft_merge(case)
    got = _peft_merge({**case, "adapter": out, "tokenizer": case["adapter"]})
    for k in want:
        assert max_abs(got[k], want[k]) <= TOL, k


def test_a_chat_template_alone_overlays_the_base_tokenizer(cases, tmp_path):
    """An adapter folder with a chat template but no vocabulary file: the base's tokenizer stays, the adapter's
    template replaces the base's."""
    from loraport.engine.vocab import TOKENIZER_FILES

    case = cases["llama_tokens_noresize"]
    ad = _copy_adapter(case, tmp_path / "ad")
    for n in TOKENIZER_FILES:
        (ad / n).unlink(missing_ok=True)
    (ad / "chat_template.jinja").write_text(TEMPLATE)
    out = tmp_path / "merged"
    res = cli("merge", "--base", case["base"], "--adapter", ad, "--out", out)
    assert res.exit_code == 0, res.stderr
    assert (out / "chat_template.jinja").read_text() == TEMPLATE != (case["base"] / "chat_template.jinja").read_text()
    assert (out / "tokenizer.json").read_bytes() == (case["base"] / "tokenizer.json").read_bytes()


def test_weighted_trainable_tokens_interpolate(cases, tmp_path):
    """--weight w on trainable tokens (no resize): W + w·(M − W), M = PEFT's merge, for rows and LoRA alike."""
    from safetensors.torch import load_file

    case = cases["llama_tokens_noresize"]
    out = tmp_path / "w"
    res = cli("merge", "--base", case["base"], "--adapter", case["adapter"], "--weight", "0.5", "--out", out)
    assert res.exit_code == 0, res.stderr
    base, merged, got = load_file(case["base"] / "model.safetensors"), _peft_merge(case), load_state(out)
    for k, t in got.items():
        want = base[k] + 0.5 * (merged[k] - base[k])
        assert max_abs(t, want) <= TOL, k
    assert not torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
