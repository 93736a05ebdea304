"""config.json checked against the checkpoint before an ONNX export traces anything.

The capture builds the architecture from config.json alone (parameters on the meta device, buffers real), so a
hostile or mismatched config (`num_hidden_layers: 3000`, `head_dim: 2**33`) would trace for minutes or
allocate terabytes before the first weight is compared. Every size the config states must be one the weights
can hold: the decoder-layer count equals the layers in the checkpoint, no stated dimension exceeds the
largest tensor dimension there, and the query projection's rows equal heads × head_dim."""

from __future__ import annotations

import re

from loraport.errors import BadInputError

# integer fields that size tensors (or buffers) in the transformers architectures we export
SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "ffn_dim", "head_dim",
             "num_attention_heads", "n_head", "num_key_value_heads", "vocab_size", "moe_intermediate_size",
             "num_local_experts", "num_experts", "kv_lora_rank", "q_lora_rank")
MAX_LAYERS = 1024
MAX_POSITIONS = 1 << 24
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _int(config: dict, key: str, where: str):
    v = config.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadInputError(f"{where}: {key} must be an integer, got {str(v)[:40]}")
    return v


def check_config(config: dict, shapes: dict[str, tuple[int, ...]], where: str = "base config.json") -> None:
    """Refuse a config whose sizes the checkpoint's tensors (`shapes`: name -> shape) contradict."""
    if not shapes:
        return
    largest = max((int(d) for s in shapes.values() for d in s), default=0)
    from loraport.onnx.replicate import layer_count_key

    key = layer_count_key(config)
    if key is not None:
        n = _int(config, key, where)
        held = {int(m.group(1)) for name in shapes if (m := _LAYER.search(name))}
        if not 1 <= n <= MAX_LAYERS:
            raise BadInputError(f"{where}: {key}={n} (expected 1..{MAX_LAYERS})")
        if held and n != max(held) + 1:
            raise BadInputError(f"{where}: {key}={n} but the weights hold {max(held) + 1} decoder layers "
                                "(config.json and weights disagree)")
    for k in SIZE_KEYS:
        v = _int(config, k, where)
        if v is not None and not 0 <= v <= largest:
            raise BadInputError(f"{where}: {k}={v} is larger than any tensor dimension in the weights "
                                f"({largest}); config.json and weights disagree")
    for k in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = _int(config, k, where)
        if v is not None and not 0 <= v <= MAX_POSITIONS:
            raise BadInputError(f"{where}: {k}={v} (at most {MAX_POSITIONS})")
    _check_heads(config, shapes, where)


def _check_heads(config: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    heads = _int(config, "num_attention_heads", where)
    hidden = _int(config, "hidden_size", where)
    if not heads or not hidden:
        return
    head_dim = _int(config, "head_dim", where) or hidden // heads
    q = next((s for n, s in shapes.items() if n.endswith(".0.self_attn.q_proj.weight")), None)
    if q is not None and len(q) == 2 and q[0] != heads * head_dim:
        raise BadInputError(f"{where}: num_attention_heads × head_dim = {heads} × {head_dim} but the "
                            f"weights' q_proj has {q[0]} rows (config.json and weights disagree)")
