"""`genai_config.json` for `--with-past` exports: what onnxruntime-genai needs to open the folder with
`og.Model(folder)` (and its `.onnx_adapter` files with `og.Adapters`). Spec: formats/onnx.md#onnxruntime-genai.

The config describes the graph loraport wrote (read from the graph's own inputs/outputs, not assumed): the
decoder's file, its input/output names with the KV-cache name patterns (`past_key_values.%d.key`,
`present.%d.key`, ...), head counts and sizes; the model's special-token ids and context length from
config.json, and the search defaults from generation_config.json (which override config.json, as in
transformers). Only graphs with a KV cache get one: onnxruntime-genai generates step by step from its cache and
has no mode for a graph without past inputs. The tokenizer files are the base folder's, copied with the other
non-weight files.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx


class NoGenaiConfig(Exception):
    """This export cannot be described to onnxruntime-genai (the message says why). The export itself is
    fine: the caller notes the reason and writes no genai_config.json."""

GENAI_CONFIG = "genai_config.json"
# the decoder-only model types onnxruntime-genai 0.18 accepts in model.type; others fall back to "decoder"
# (its generic decoder-only model: the same inputs and outputs, no family-specific handling)
GENAI_TYPES = frozenset({"chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "granite", "llama",
                         "mistral", "nemotron", "olmo", "phi3", "qwen2", "qwen3", "smollm3"})
# config.json spells these differently per family: the first key present wins
_KEYS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "context_length": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                       "n_ctx"),
}
# search options and their defaults (generation_config.json / config.json may set each)
_SEARCH = {"diversity_penalty": 0.0, "do_sample": False, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
           "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "temperature": 1.0,
           "top_k": 50, "top_p": 1.0}


def _first(cfg: dict, kind: str):
    for k in _KEYS[kind]:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise NoGenaiConfig(f"{path.name} is not valid JSON") from None
    return d if isinstance(d, dict) else {}


def tokenizer_eos(root: Path | None) -> int | None:
    """The id of tokenizer_config.json's `eos_token` in tokenizer.json (added tokens, then the vocabulary):
    chat models end a turn with it while config.json often names another token."""
    if root is None:
        return None
    tc = _read_json(root / "tokenizer_config.json")
    eos = tc.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str):
        return None
    tj = _read_json(root / "tokenizer.json")
    for t in tj.get("added_tokens") or []:
        if isinstance(t, dict) and t.get("content") == eos and isinstance(t.get("id"), int):
            return t["id"]
    vocab = (tj.get("model") or {}).get("vocab") if isinstance(tj.get("model"), dict) else None
    v = vocab.get(eos) if isinstance(vocab, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _token_id(v):
    """A token id as genai reads it: an int, or a list of ints for eos; None when unusable."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return v if len(v) > 1 else v[0]
    return None


def _option(key: str, default, *sources: dict):
    """A search option from the first source that sets it with the right type (an int where a float is
    expected counts), else the default."""
    for src in sources:
        v = src.get(key)
        if isinstance(default, bool):
            if isinstance(v, bool):
                return v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v) if isinstance(default, float) else int(v)
    return default


def _io(proto: onnx.ModelProto) -> tuple[dict, dict, int, int, int]:
    """genai's decoder inputs/outputs for the graph, plus (layers, kv_heads, head_size) from its past inputs."""
    ins = [i.name for i in proto.graph.input]
    outs = [o.name for o in proto.graph.output]
    past = [i for i in proto.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if not past or "input_ids" not in ins or "logits" not in outs:
        raise NoGenaiConfig("the graph has no input_ids, logits or KV cache")
    dims = past[0].type.tensor_type.shape.dim
    kv_heads, head_size = dims[1].dim_value, dims[3].dim_value
    if not kv_heads or not head_size:
        raise NoGenaiConfig(f"graph input {past[0].name}: kv_heads / head_dim are not fixed sizes")
    for i in past:
        d = i.type.tensor_type.shape.dim
        if (d[1].dim_value, d[3].dim_value) != (kv_heads, head_size):
            raise NoGenaiConfig(f"layers cache different shapes ({i.name}); onnxruntime-genai sizes every "
                                "layer's cache alike")
    inputs = {k: k for k in ("input_ids", "attention_mask", "position_ids") if k in ins}
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    return inputs, outputs, len(past), kv_heads, head_size


def genai_config(proto: onnx.ModelProto, config: dict, generation: dict, model_file: str,
                 turn_end: int | None = None) -> dict:
    """The genai_config.json dict for the exported graph `proto` (the file `model_file`) of a model whose
    config.json is `config` and generation_config.json `generation` ({} when absent); `turn_end`: the
    tokenizer's eos id, added to the eos ids when they lack it (as onnxruntime-genai's own builder does)."""
    inputs, outputs, layers, kv_heads, head_size = _io(proto)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    cfg = {**text, **config} if not _first(config, "hidden_size") else config
    hidden = _first(cfg, "hidden_size")
    heads = _first(cfg, "num_attention_heads")
    if hidden is None or heads is None:
        raise NoGenaiConfig("config.json names no hidden size / attention head count")
    ids = {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids[k] = _token_id(generation.get(k))
        if ids[k] is None:
            ids[k] = _token_id(cfg.get(k))
    eos = ids["eos_token_id"]
    eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if turn_end is not None and turn_end not in eos_list:
        ids["eos_token_id"] = [turn_end, *eos_list] if eos_list else turn_end
    if ids["eos_token_id"] is None:
        raise NoGenaiConfig("no eos_token_id in generation_config.json, config.json or the tokenizer files "
                            "(onnxruntime-genai needs one to stop)")
    if ids["bos_token_id"] is None:
        ids["bos_token_id"] = ids["eos_token_id"] if isinstance(ids["eos_token_id"], int) else ids["eos_token_id"][0]
    if ids["pad_token_id"] is None:
        eos = ids["eos_token_id"]
        ids["pad_token_id"] = eos if isinstance(eos, int) else eos[0]
    context = _first(cfg, "context_length") or 2048
    vocab = cfg.get("vocab_size")
    out_dims = proto.graph.output[[o.name for o in proto.graph.output].index("logits")].type.tensor_type.shape.dim
    if out_dims and out_dims[-1].dim_value:
        vocab = out_dims[-1].dim_value  # the graph's own logits width (a padded vocabulary included)
    model_type = str(cfg.get("model_type") or "")
    search = {k: _option(k, d, generation, cfg) for k, d in _SEARCH.items()}
    search.update(early_stopping=True, max_length=context, min_length=0,
                  past_present_share_buffer=False)  # present is past + new (Concat), not a max_length buffer
    return {
        "model": {
            "type": model_type if model_type in GENAI_TYPES else "decoder",
            "bos_token_id": ids["bos_token_id"],
            "eos_token_id": ids["eos_token_id"],
            "pad_token_id": ids["pad_token_id"],
            "context_length": context,
            "vocab_size": vocab,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_size,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        "search": dict(sorted(search.items())),
    }


def write_genai_config(folder: Path, proto: onnx.ModelProto, config: dict, base_root: Path | None,
                       model_file: str) -> tuple[str | None, str | None]:
    """Write `folder/genai_config.json` for `proto` (generation_config.json and the tokenizer files are read
    from the base folder). Returns (file name, None), or (None, why not) when genai cannot be described."""
    try:
        gen = _read_json(base_root / "generation_config.json") if base_root is not None else {}
        cfg = genai_config(proto, config, gen, model_file, tokenizer_eos(base_root))
    except NoGenaiConfig as e:
        return None, f"no {GENAI_CONFIG} (onnxruntime-genai cannot open this folder): {e}"
    (folder / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return GENAI_CONFIG, None
