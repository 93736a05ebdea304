"""Name tables for decoder LLMs: Hugging Face transformers ↔ llama.cpp GGUF ↔ torchtune (Meta layout) ↔ MLX.

Kept as data (the gguf-py tensor_mapping style): one row per canonical tensor kind, a column per spelling
(dialect), annotated with the families that use it; one function, `translate`, walks them (source spelling
→ canonical key → target spelling). HF names are the on-disk transformers names
(`model.layers.N.self_attn.q_proj.weight`); `{bid}` is the block index, `{xid}` an expert index.

The RoPE row permutation: HF checkpoints of the Llama family store q/k rows "half-split" per head, while
Meta's original layout (kept by torchtune) and llama.cpp's GGUF interleave the rotary pairs. Converting HF →
Meta/GGUF permutes the rows of q_proj/k_proj (llama.cpp `LlamaModel.permute`, torchtune `_permute`); for a
LoRA only B's rows move (ΔW = B@A, the rows of ΔW are the rows of B).
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from functools import cache

import torch

# --- the tables: one row per canonical tensor, a column per spelling (dialect) ------------------------------
# Dialects: hf = transformers on-disk names; gguf = llama.cpp; torchtune = Meta's layout as torchtune keeps it;
# mlx = mlx-lm module paths (equal to hf's except where `sanitize()` stacks MoE experts into a SwitchLinear);
# hf_stacked = transformers ≥ 5's in-memory stacked experts, `name:i` = the i-th half of its output rows (Mixtral's
# `block_sparse_moe` is renamed `mlp` in memory; save_pretrained writes the per-expert hf names back).
# Where a dialect places a block's tensors; model-level tensors have no prefix.
BLOCK_PREFIX: dict[str, str] = {"hf": "model.layers.{bid}.", "gguf": "blk.{bid}.", "torchtune": "layers.{bid}.",
                                "mlx": "model.layers.{bid}.", "hf_stacked": "model.layers.{bid}."}
ALL = "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe gemma"  # the GGUF families (HF model_type-like)
DENSE = "llama mistral qwen2 qwen3 gemma"
Q_MOE = "qwen2moe qwen3moe"
NO_GEMMA = "llama mistral mixtral qwen2 qwen2moe qwen3 qwen3moe"


@dataclass(frozen=True)
class Row:
    """One tensor kind, one rename: its spelling in each dialect (None: the dialect has no such tensor).
    `families`: the model families that use the hf spelling; several rows may share a kind where families
    spell it differently (Mixtral's `block_sparse_moe.gate` is Qwen-MoE's `mlp.gate`)."""

    kind: str
    block: bool  # under a transformer block ({bid}) or model-level
    hf: str | None
    gguf: str | None
    torchtune: str | None
    families: str


# Plain renames. torchtune keys have no "model." prefix and its norms spell `.weight` as `.scale`
# (torchtune's own tables cover llama2 llama3 mistral qwen2). Order matters where a GGUF spelling has two HF
# spellings: without the base's names to choose, the first line wins.
TENSORS: tuple[Row, ...] = (
    #   kind              block  hf                            gguf              torchtune           families
    Row("attn_q",         True,  "self_attn.q_proj",            "attn_q",         "attn.q_proj",      ALL),
    Row("attn_k",         True,  "self_attn.k_proj",            "attn_k",         "attn.k_proj",      ALL),
    Row("attn_v",         True,  "self_attn.v_proj",            "attn_v",         "attn.v_proj",      ALL),
    Row("attn_output",    True,  "self_attn.o_proj",            "attn_output",    "attn.output_proj", ALL),
    Row("ffn_gate",       True,  "mlp.gate_proj",               "ffn_gate",       "mlp.w1",           DENSE),
    Row("ffn_up",         True,  "mlp.up_proj",                 "ffn_up",         "mlp.w3",           DENSE),
    Row("ffn_down",       True,  "mlp.down_proj",               "ffn_down",       "mlp.w2",           DENSE),
    Row("attn_norm",      True,  "input_layernorm",             "attn_norm",      "sa_norm",          ALL),
    Row("ffn_norm",       True,  "post_attention_layernorm",    "ffn_norm",       "mlp_norm",         ALL),
    Row("attn_q_norm",    True,  "self_attn.q_norm",            "attn_q_norm",    None,               "qwen3 qwen3moe"),
    Row("attn_k_norm",    True,  "self_attn.k_norm",            "attn_k_norm",    None,               "qwen3 qwen3moe"),
    Row("ffn_gate_inp",   True,  "mlp.gate",                    "ffn_gate_inp",   None,               Q_MOE),
    Row("ffn_gate_inp",   True,  "block_sparse_moe.gate",       "ffn_gate_inp",   None,               "mixtral"),
    Row("ffn_gate_shexp", True,  "mlp.shared_expert.gate_proj", "ffn_gate_shexp", None,               "qwen2moe"),
    Row("ffn_up_shexp",   True,  "mlp.shared_expert.up_proj",   "ffn_up_shexp",   None,               "qwen2moe"),
    Row("ffn_down_shexp", True,  "mlp.shared_expert.down_proj", "ffn_down_shexp", None,               "qwen2moe"),
    Row("token_embd",     False, "model.embed_tokens",          "token_embd",     "tok_embeddings",   ALL),
    Row("output",         False, "lm_head",                     "output",         "output",           NO_GEMMA),
    Row("output_norm",    False, "model.norm",                  "output_norm",    "norm",             ALL),
)


@dataclass(frozen=True)
class ExpertRow:
    """One MoE expert projection: the per-expert HF module ({xid} = expert index) and the stacked tensors
    that hold all experts at once (GGUF `[E, out, in]`, MLX SwitchLinear, transformers ≥ 5)."""

    kind: str
    hf: str
    gguf: str
    mlx: str
    hf_stacked: str
    families: str
    block = True  # always under a transformer block (a class constant, not a column)


EXPERTS: tuple[ExpertRow, ...] = (
    #         kind             hf (per expert)                       gguf
    #         mlx (SwitchLinear)                        hf_stacked (`:i`: i-th half of fused rows)  families
    ExpertRow("ffn_gate_exps", "mlp.experts.{xid}.gate_proj",        "ffn_gate_exps",
              "mlp.switch_mlp.gate_proj",               "mlp.experts.gate_up_proj:0",               Q_MOE),
    ExpertRow("ffn_up_exps",   "mlp.experts.{xid}.up_proj",          "ffn_up_exps",
              "mlp.switch_mlp.up_proj",                 "mlp.experts.gate_up_proj:1",               Q_MOE),
    ExpertRow("ffn_down_exps", "mlp.experts.{xid}.down_proj",        "ffn_down_exps",
              "mlp.switch_mlp.down_proj",               "mlp.experts.down_proj",                    Q_MOE),
    ExpertRow("ffn_gate_exps", "block_sparse_moe.experts.{xid}.w1",  "ffn_gate_exps",
              "block_sparse_moe.switch_mlp.gate_proj",  "mlp.experts.gate_up_proj:0",               "mixtral"),
    ExpertRow("ffn_up_exps",   "block_sparse_moe.experts.{xid}.w3",  "ffn_up_exps",
              "block_sparse_moe.switch_mlp.up_proj",    "mlp.experts.gate_up_proj:1",               "mixtral"),
    ExpertRow("ffn_down_exps", "block_sparse_moe.experts.{xid}.w2",  "ffn_down_exps",
              "block_sparse_moe.switch_mlp.down_proj",  "mlp.experts.down_proj",                    "mixtral"),
)

# GGUF ↔ HF views of TENSORS, (gguf, hf, families) as gguf-py's TensorNameMap is checked against
GGUF_BLOCK = tuple((r.gguf, r.hf, r.families) for r in TENSORS if r.block and r.gguf and r.hf)
GGUF_GLOBAL = tuple((r.gguf, r.hf, r.families) for r in TENSORS if not r.block and r.gguf and r.hf)

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
# model types whose torchtune checkpoints keep Meta's interleaved q/k rows (torchtune convert_weights._permute)
TORCHTUNE_PERMUTED = ("llama", "mistral")
# config.json keys giving an MoE model's expert count: Qwen-MoE / OLMoE, Mixtral, DeepSeek-V2/V3 (routed experts)
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")

# module names (last path components) that are token embeddings: ΔW is stored transposed in PEFT, and
# MLX/GGUF store its factors differently from a Linear's
EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "token_embd")


# --- the one walker: source spelling -> canonical key -> target spelling ----------------------------------
# Parameter suffixes each dialect spells (mlx names modules, hf_stacked bare parameters); torchtune's `.scale`
# is a norm's `.weight`. Expert tensors are weights only.
_PARAMS = {"hf": ("weight", "bias"), "gguf": ("weight", "bias"), "torchtune": ("weight", "bias", "scale")}
_EXPERT_PARAMS = {"hf": ("weight",), "gguf": ("weight",)}


@dataclass(frozen=True)
class Key:
    """A tensor's canonical identity: its table row, block index, expert index and parameter."""

    row: Row | ExpertRow
    bid: str | None
    xid: int | None
    param: str


@cache
def _pattern(row: Row | ExpertRow, dialect: str) -> re.Pattern | None:
    spelling = getattr(row, dialect, None)
    if spelling is None:
        return None
    prefix = BLOCK_PREFIX[dialect] if row.block else ""
    rx = re.escape(prefix + spelling).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{xid\}", r"(?P<xid>\d+)")
    return re.compile("^" + rx + "$")


def _split_param(name: str, params: tuple[str, ...]) -> tuple[str, str]:
    for p in params:
        if name.endswith("." + p):
            return name[: -len(p) - 1], p
    return name, ""


def canonical(name: str, dialect: str, experts: bool = False) -> list[Key]:
    """Every canonical key `name` spells in `dialect`, in table order (several where families differ)."""
    table = EXPERTS if experts else TENSORS
    mod, param = _split_param(name, (_EXPERT_PARAMS if experts else _PARAMS).get(dialect, ()))
    keys = []
    for row in table:
        m = (p := _pattern(row, dialect)) and p.match(mod)
        if m:
            g = m.groupdict()
            xid = int(g["xid"]) if g.get("xid") is not None else None
            keys.append(Key(row, g.get("bid"), xid, "weight" if param == "scale" else param))
    return keys


def spell(key: Key, dialect: str) -> str | None:
    """The tensor `key` in `dialect`; a per-expert spelling of a stacked key keeps `{xid}` (a template)."""
    spelling = getattr(key.row, dialect, None)
    if spelling is None:
        return None
    name = (BLOCK_PREFIX[dialect].format(bid=key.bid) if key.row.block else "") + spelling
    if key.xid is not None:
        name = name.replace("{xid}", str(key.xid))
    if isinstance(key.row, ExpertRow):
        return name + ".weight" if dialect in _EXPERT_PARAMS else name
    if dialect == "torchtune" and spelling.endswith("norm"):
        return name + ".scale"
    return f"{name}.{key.param}" if key.param else name


def translate(name: str, src: str, dst: str, candidates: Container[str] | None = None, *,
              experts: bool = False) -> str | None:
    """`name` spelled in dialect `src` -> its spelling in `dst` (None if not in the table).

    Where several `dst` spellings exist (Mixtral's `block_sparse_moe.gate` vs `mlp.gate`), `candidates` (the
    base's names) picks the one that exists; without it the first line of the table wins. `experts=True`
    walks the expert table: a per-expert name gives the stacked tensor that holds it (its index:
    `expert_index`), a stacked name the per-expert template with `{xid}` (matched as expert 0)."""
    if src not in BLOCK_PREFIX or dst not in BLOCK_PREFIX:
        raise ValueError(f"unknown name dialect {src if src not in BLOCK_PREFIX else dst!r}")
    options = [s for k in canonical(name, src, experts) if (s := spell(k, dst)) is not None]
    if not options:
        return None
    if candidates is not None:
        for o in options:
            if o.replace("{xid}", "0") in candidates:
                return o
    return options[0]


def expert_index(name: str, dialect: str = "hf") -> int | None:
    """The expert index in a per-expert name (`...mlp.experts.5.gate_proj.weight` -> 5), else None."""
    keys = canonical(name, dialect, experts=True)
    return keys[0].xid if keys else None


def hf_to_gguf(hf: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (None if not in the table)."""
    return translate(hf, "hf", "gguf")


def gguf_to_hf(name: str, candidates: Container[str] | None = None) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; `candidates` as in `translate`."""
    return translate(name, "gguf", "hf", candidates)


def num_experts(config: dict | None, seen: int) -> int:
    """An MoE base's expert count from its config.json, else `seen` (the highest expert index + 1)."""
    if isinstance(config, dict):
        for k in EXPERT_COUNT_KEYS:
            v = config.get(k)
            if isinstance(v, int) and v > 0:
                return v
    return seen


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
