"""Name tables for decoder LLMs: Hugging Face transformers ↔ llama.cpp GGUF ↔ torchtune (Meta layout) ↔ MLX.

Kept as data, one line per spelling, annotated with the families that use it (the gguf-py tensor_mapping
style); the few functions below only walk these tables. HF names are the on-disk transformers names
(`model.layers.N.self_attn.q_proj.weight`); `{bid}` is the block index, `{xid}` an expert index.

The RoPE row permutation: HF checkpoints of the Llama family store q/k rows "half-split" per head, while
Meta's original layout (kept by torchtune) and llama.cpp's GGUF interleave the rotary pairs. Converting HF →
Meta/GGUF permutes the rows of q_proj/k_proj (llama.cpp `LlamaModel.permute`, torchtune `_permute`); for a
LoRA only B's rows move (ΔW = B@A, the rows of ΔW are the rows of B).
"""

from __future__ import annotations

import re

import torch

# --- HF block module (relative to model.layers.{bid}.) ↔ GGUF tensor (relative to blk.{bid}.) --------------
# (gguf, hf, families)
GGUF_BLOCK: tuple[tuple[str, str, str], ...] = (
    ("attn_q", "self_attn.q_proj", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"),
    ("attn_k", "self_attn.k_proj", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"),
    ("attn_v", "self_attn.v_proj", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"),
    ("attn_output", "self_attn.o_proj", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"),
    ("ffn_gate", "mlp.gate_proj", "llama mistral qwen2 qwen3 gemma"),
    ("ffn_up", "mlp.up_proj", "llama mistral qwen2 qwen3 gemma"),
    ("ffn_down", "mlp.down_proj", "llama mistral qwen2 qwen3 gemma"),
    ("attn_norm", "input_layernorm", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"),
    ("ffn_norm", "post_attention_layernorm", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"),
    ("attn_q_norm", "self_attn.q_norm", "qwen3 qwen3moe"),
    ("attn_k_norm", "self_attn.k_norm", "qwen3 qwen3moe"),
    ("ffn_gate_inp", "mlp.gate", "qwen2moe qwen3moe"),
    ("ffn_gate_inp", "block_sparse_moe.gate", "mixtral"),
    ("ffn_gate_shexp", "mlp.shared_expert.gate_proj", "qwen2moe"),
    ("ffn_up_shexp", "mlp.shared_expert.up_proj", "qwen2moe"),
    ("ffn_down_shexp", "mlp.shared_expert.down_proj", "qwen2moe"),
)

# Model-level tensors: (gguf, hf, families)
GGUF_GLOBAL: tuple[tuple[str, str, str], ...] = (
    ("token_embd", "model.embed_tokens", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"),
    ("output", "lm_head", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe"),
    ("output_norm", "model.norm", "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"),
)

# Stacked expert tensors in GGUF ([E, out, in]) ↔ the per-expert HF modules they stack: (gguf, hf, families)
GGUF_EXPERTS: tuple[tuple[str, str, str], ...] = (
    ("ffn_gate_exps", "mlp.experts.{xid}.gate_proj", "qwen2moe qwen3moe"),
    ("ffn_up_exps", "mlp.experts.{xid}.up_proj", "qwen2moe qwen3moe"),
    ("ffn_down_exps", "mlp.experts.{xid}.down_proj", "qwen2moe qwen3moe"),
    ("ffn_gate_exps", "block_sparse_moe.experts.{xid}.w1", "mixtral"),
    ("ffn_up_exps", "block_sparse_moe.experts.{xid}.w3", "mixtral"),
    ("ffn_down_exps", "block_sparse_moe.experts.{xid}.w2", "mixtral"),
)

# HF config model_type -> (GGUF general.architecture, q/k rows RoPE-permuted in GGUF)
GGUF_ARCH: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),  # convert_hf_to_gguf LlamaModel: permute q/k
    "mistral": ("llama", True),  # MistralForCausalLM is converted by LlamaModel
    "mixtral": ("llama", True),
    "qwen2": ("qwen2", False),  # Qwen2Model: no permute (NeoX-style RoPE)
    "qwen2_moe": ("qwen2moe", False),
    "qwen3": ("qwen3", False),
    "qwen3_moe": ("qwen3moe", False),
    "gemma": ("gemma", False),
}

# --- torchtune (Meta layout) ↔ HF -------------------------------------------------------------------------
# (torchtune, hf, families)   torchtune keys have no "model." prefix; norms use ".scale" for ".weight"
TORCHTUNE_BLOCK: tuple[tuple[str, str, str], ...] = (
    ("attn.q_proj", "self_attn.q_proj", "llama2 llama3 mistral qwen2"),
    ("attn.k_proj", "self_attn.k_proj", "llama2 llama3 mistral qwen2"),
    ("attn.v_proj", "self_attn.v_proj", "llama2 llama3 mistral qwen2"),
    ("attn.output_proj", "self_attn.o_proj", "llama2 llama3 mistral qwen2"),
    ("mlp.w1", "mlp.gate_proj", "llama2 llama3 mistral qwen2"),
    ("mlp.w2", "mlp.down_proj", "llama2 llama3 mistral qwen2"),
    ("mlp.w3", "mlp.up_proj", "llama2 llama3 mistral qwen2"),
    ("sa_norm", "input_layernorm", "llama2 llama3 mistral qwen2"),
    ("mlp_norm", "post_attention_layernorm", "llama2 llama3 mistral qwen2"),
)
TORCHTUNE_GLOBAL: tuple[tuple[str, str, str], ...] = (
    ("tok_embeddings", "model.embed_tokens", "llama2 llama3 mistral qwen2"),
    ("output", "lm_head", "llama2 llama3 mistral qwen2"),
    ("norm", "model.norm", "llama2 llama3 mistral qwen2"),
)
# model types whose torchtune checkpoints keep Meta's interleaved q/k rows (torchtune convert_weights._permute)
TORCHTUNE_PERMUTED = ("llama", "mistral")

# --- MLX (mlx-lm) ↔ HF -------------------------------------------------------------------------------------
# MLX module paths equal HF module paths except where mlx-lm's `sanitize()` stacks MoE experts into a
# SwitchLinear. (mlx, hf per-expert, stacked-HF (transformers ≥ 5 in memory) and out-row slice, families)
MLX_SWITCH: tuple[tuple[str, str, str, str], ...] = (
    ("mlp.switch_mlp.gate_proj", "mlp.experts.{xid}.gate_proj", "mlp.experts.gate_up_proj:0", "qwen2moe qwen3moe"),
    ("mlp.switch_mlp.up_proj", "mlp.experts.{xid}.up_proj", "mlp.experts.gate_up_proj:1", "qwen2moe qwen3moe"),
    ("mlp.switch_mlp.down_proj", "mlp.experts.{xid}.down_proj", "mlp.experts.down_proj", "qwen2moe qwen3moe"),
    ("block_sparse_moe.switch_mlp.gate_proj", "block_sparse_moe.experts.{xid}.w1",
     "block_sparse_moe.experts.gate_up_proj:0", "mixtral"),
    ("block_sparse_moe.switch_mlp.up_proj", "block_sparse_moe.experts.{xid}.w3",
     "block_sparse_moe.experts.gate_up_proj:1", "mixtral"),
    ("block_sparse_moe.switch_mlp.down_proj", "block_sparse_moe.experts.{xid}.w2",
     "block_sparse_moe.experts.down_proj", "mixtral"),
)

# module names (last path components) that are token embeddings: ΔW is stored transposed in PEFT, and
# MLX/GGUF store its factors differently from a Linear's
EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "token_embd")


# --- lookups ---------------------------------------------------------------------------------------------
_BLOCK_HF = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLOCK_GGUF = re.compile(r"^blk\.(\d+)\.(.+)$")
_BLOCK_TT = re.compile(r"^layers\.(\d+)\.(.+)$")


def _split_param(name: str, params: tuple[str, ...]) -> tuple[str, str]:
    for p in params:
        if name.endswith("." + p):
            return name[: -len(p) - 1], p
    return name, ""


def hf_to_gguf(hf: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (None if not in the table)."""
    mod, param = _split_param(hf, ("weight", "bias"))
    suffix = "." + param if param else ""
    m = _BLOCK_HF.match(mod)
    if m:
        for g, h, _ in GGUF_BLOCK:
            if m.group(2) == h:
                return f"blk.{m.group(1)}.{g}{suffix}"
        return None
    for g, h, _ in GGUF_GLOBAL:
        if mod == h:
            return g + suffix
    return None


def gguf_to_hf(name: str, candidates=None) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`. Where several HF spellings exist
    (e.g. Mixtral's `block_sparse_moe.gate` vs `mlp.gate`), `candidates` (the base's names) picks the one
    that exists; without it the first line of the table wins."""
    mod, param = _split_param(name, ("weight", "bias"))
    suffix = "." + param if param else ""
    m = _BLOCK_GGUF.match(mod)
    if m:
        options = [f"model.layers.{m.group(1)}.{h}{suffix}" for g, h, _ in GGUF_BLOCK if g == m.group(2)]
    else:
        options = [h + suffix for g, h, _ in GGUF_GLOBAL if g == mod]
    if not options:
        return None
    if candidates is not None:
        for o in options:
            if o in candidates:
                return o
    return options[0]


def gguf_experts_to_hf(name: str, n_experts: int, candidates=None) -> list[str] | None:
    """`blk.0.ffn_gate_exps.weight` -> the per-expert HF names it stacks, in expert order."""
    mod, param = _split_param(name, ("weight",))
    m = _BLOCK_GGUF.match(mod)
    if not m:
        return None
    options = [[f"model.layers.{m.group(1)}.{h.format(xid=e)}.weight" for e in range(n_experts)]
               for g, h, _ in GGUF_EXPERTS if g == m.group(2)]
    if not options:
        return None
    if candidates is not None:
        for o in options:
            if o[0] in candidates:
                return o
    return options[0]


def hf_experts_to_gguf(hf: str) -> tuple[str, int] | None:
    """`model.layers.0.mlp.experts.5.gate_proj.weight` -> (`blk.0.ffn_gate_exps.weight`, 5)."""
    mod, _ = _split_param(hf, ("weight",))
    m = _BLOCK_HF.match(mod)
    if not m:
        return None
    for g, h, _ in GGUF_EXPERTS:
        pat = "^" + re.escape(h).replace(r"\{xid\}", r"(\d+)") + "$"
        mm = re.match(pat, m.group(2))
        if mm:
            return f"blk.{m.group(1)}.{g}.weight", int(mm.group(1))
    return None


def torchtune_to_hf(name: str) -> str | None:
    """`layers.0.attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj.weight`; norms' `.scale` -> `.weight`."""
    mod, param = _split_param(name, ("weight", "bias", "scale"))
    param = "weight" if param == "scale" else param
    suffix = "." + param if param else ""
    m = _BLOCK_TT.match(mod)
    if m:
        for t, h, _ in TORCHTUNE_BLOCK:
            if m.group(2) == t:
                return f"model.layers.{m.group(1)}.{h}{suffix}"
        return None
    for t, h, _ in TORCHTUNE_GLOBAL:
        if mod == t:
            return h + suffix
    return None


def hf_to_torchtune(hf: str) -> str | None:
    mod, param = _split_param(hf, ("weight", "bias"))
    suffix = "." + param if param else ""
    m = _BLOCK_HF.match(mod)
    if m:
        for t, h, _ in TORCHTUNE_BLOCK:
            if m.group(2) == h:
                if t.endswith("norm"):
                    suffix = ".scale"
                return f"layers.{m.group(1)}.{t}{suffix}"
        return None
    for t, h, _ in TORCHTUNE_GLOBAL:
        if mod == h:
            return t + (".scale" if t == "norm" else suffix)
    return None


def mlx_switch_to_hf(module: str) -> tuple[str, str, str] | None:
    """An MLX SwitchLinear module path -> (per-expert HF template with {xid}, stacked HF name, out-part index)
    e.g. `model.layers.0.mlp.switch_mlp.up_proj` -> (`model.layers.0.mlp.experts.{xid}.up_proj.weight`,
    `model.layers.0.mlp.experts.gate_up_proj`, "1")."""
    m = _BLOCK_HF.match(module)
    if not m:
        return None
    for x, h, stacked, _ in MLX_SWITCH:
        if m.group(2) == x:
            name, _, part = stacked.partition(":")
            pre = f"model.layers.{m.group(1)}."
            return pre + h + ".weight", pre + name, part
    return None


def hf_experts_to_mlx(hf: str) -> tuple[str, int] | None:
    """`model.layers.0.mlp.experts.5.gate_proj.weight` -> (`model.layers.0.mlp.switch_mlp.gate_proj`, 5)."""
    mod, _ = _split_param(hf, ("weight",))
    m = _BLOCK_HF.match(mod)
    if not m:
        return None
    for x, h, _, _ in MLX_SWITCH:
        pat = "^" + re.escape(h).replace(r"\{xid\}", r"(\d+)") + "$"
        mm = re.match(pat, m.group(2))
        if mm:
            return f"model.layers.{m.group(1)}.{x}", int(mm.group(1))
    return None


def is_embedding(name: str) -> bool:
    mod, _ = _split_param(name, ("weight",))
    return mod.rsplit(".", 1)[-1] in EMBEDDING_MODULES


def qk_kind(hf: str) -> str | None:
    """"q" / "k" for HF attention q/k projection weights, else None."""
    if re.search(r"\.self_attn\.q_proj\.weight$", hf):
        return "q"
    if re.search(r"\.self_attn\.k_proj\.weight$", hf):
        return "k"
    return None


# --- the RoPE row permutation (pure functions of tensors) -------------------------------------------------
def rope_permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rows -> Meta/GGUF rows (per head: [half0 | half1] -> interleaved pairs). Rows = dim 0."""
    rows = t.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def rope_unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Meta/GGUF rows -> HF rows (inverse of `rope_permute_rows`)."""
    rows = t.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def head_counts(config: dict) -> tuple[int, int]:
    """(num_attention_heads, num_key_value_heads) from an HF config.json."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    nh = cfg.get("num_attention_heads")
    nkv = cfg.get("num_key_value_heads") or nh
    if not isinstance(nh, int) or not isinstance(nkv, int) or nh <= 0 or nkv <= 0:
        raise ValueError("config.json lacks num_attention_heads / num_key_value_heads")
    return nh, nkv
