"""HF ↔ llama.cpp GGUF tensor names for every architecture the `gguf` package knows.

gguf-py's `TensorNameMap` (`gguf/tensor_mapping.py`) is llama.cpp's own table: for each GGUF tensor kind, every
HF spelling of it. It is the name authority here; loraport adds only what that map lacks:
  * which GGUF architecture an HF `model_type` converts to, and whether llama.cpp's `convert_hf_to_gguf.py`
    permutes q/k rows for its RoPE layout (`LlamaModel.undo_permute`: True for the Llama-derived classes
    that keep it, False for Llama 4 / Apertus and every non-Llama class) — `ARCHS` below;
  * the HF tensors the converter reshapes into something a LoRA pair cannot follow (DeepSeek's MLA
    `kv_b_proj`, split per head into `attn_k_b` (transposed) and `attn_v_b`) — refused by name;
  * per-expert MoE names and the MLX / torchtune dialects, which stay in `loraport/names/llm.py`.
The map is a superset per architecture (it lists spellings of other families under the same kind), so it is
only ever asked about names the base really has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Arch:
    """How one HF `model_type` converts: its GGUF `general.architecture`, whether q/k rows are RoPE-permuted
    (B's rows for a LoRA), and the HF modules (name suffixes) with no GGUF LoRA form."""

    gguf: str
    permute: bool = False
    no_lora: tuple[str, ...] = ()


_MLA = ("self_attn.kv_b_proj",)
# HF config model_type -> Arch; convert_hf_to_gguf's class for it in the comment (permute: LlamaModel family)
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", True),  # LlamaModel
    "mistral": Arch("llama", True),  # MistralForCausalLM → LlamaModel
    "mixtral": Arch("llama", True),  # MixtralForCausalLM → LlamaModel
    "granite": Arch("granite", True),  # GraniteModel(LlamaModel)
    "granitemoe": Arch("granitemoe", True),  # GraniteMoeModel(GraniteModel)
    "smollm3": Arch("smollm3", True),  # SmolLM3Model(LlamaModel)
    "arcee": Arch("arcee", True),  # ArceeModel(LlamaModel)
    "llama4_text": Arch("llama4", False),  # Llama4Model: undo_permute = False
    "apertus": Arch("apertus", False),  # ApertusModel: undo_permute = False
    "qwen2": Arch("qwen2"),
    "qwen2_moe": Arch("qwen2moe"),
    "qwen3": Arch("qwen3"),
    "qwen3_moe": Arch("qwen3moe"),
    "gemma": Arch("gemma"),
    "gemma2": Arch("gemma2"),
    "gemma3_text": Arch("gemma3"),  # Gemma3ForCausalLM
    "phi3": Arch("phi3"),  # Phi-3 and Phi-4 (fused qkv_proj / gate_up_proj, as llama.cpp keeps them)
    "phimoe": Arch("phimoe"),
    "gpt_oss": Arch("gpt-oss"),
    "glm": Arch("chatglm"),  # GlmForCausalLM → ChatGLMModel
    "glm4": Arch("glm4"),
    "glm4_moe": Arch("glm4moe"),
    "deepseek_v2": Arch("deepseek2", no_lora=_MLA),
    "deepseek_v3": Arch("deepseek2", no_lora=_MLA),  # DeepseekV3ForCausalLM → DeepseekV2Model
    "olmo": Arch("olmo"),
    "olmo2": Arch("olmo2"),
    "olmoe": Arch("olmoe"),
    "starcoder2": Arch("starcoder2"),
    "stablelm": Arch("stablelm"),
    "cohere": Arch("command-r"),
    "cohere2": Arch("cohere2"),
    "exaone4": Arch("exaone4"),
    "seed_oss": Arch("seed_oss"),
    "ernie4_5": Arch("ernie4_5"),
}

_SUFFIXES = (".weight", ".bias")
_BID = re.compile(r"\.layers\.(\d+)\.|^blk\.(\d+)\.")


class UnknownArch(LookupError):
    """The installed `gguf` package has no such architecture (an older gguf than the table was written for)."""


@cache
def _name_map(arch: str, n_blocks: int):
    import gguf

    for k, v in gguf.MODEL_ARCH_NAMES.items():
        if v == arch:
            return gguf.get_tensor_name_map(k, n_blocks)
    raise UnknownArch(f"the installed gguf package ({gguf.__name__}) has no architecture {arch!r}; upgrade gguf")


def _blocks(names: Iterable[str]) -> int:
    """Blocks to build the map for: one past the highest block index in `names` (the map is per block)."""
    top = -1
    for n in names:
        m = _BID.search(n)
        if m:
            top = max(top, int(m.group(1) or m.group(2)))
    return top + 1


def gguf_name(hf: str, arch: str, n_blocks: int | None = None) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` for GGUF architecture `arch`, by
    gguf-py's TensorNameMap (None where the map has no spelling)."""
    return _name_map(arch, n_blocks or _blocks([hf])).get_name(hf, try_suffixes=_SUFFIXES)


def hf_names(gguf_stems: Iterable[str], arch: str, base_names: Iterable[str]) -> dict[str, str]:
    """GGUF tensor name -> the base's HF name, for the base names the map spells in `arch` (the map's
    spellings of other families never meet a real base). A GGUF name two base tensors claim is dropped."""
    names = list(base_names)
    n = max(_blocks(names), _blocks(gguf_stems))
    m = _name_map(arch, n)
    out: dict[str, str] = {}
    seen: set[str] = set()
    for hf in names:
        g = m.get_name(hf, try_suffixes=_SUFFIXES)
        if g is None:
            continue
        if g in seen:
            out.pop(g, None)
            continue
        seen.add(g)
        out[g] = hf
    return out


def refused(hf: str, arch: Arch) -> str | None:
    """The module suffix of `hf` the converter reshapes beyond a LoRA pair, else None."""
    mod = hf.rsplit(".", 1)[0] if hf.endswith(_SUFFIXES) else hf
    return next((s for s in arch.no_lora if mod.endswith("." + s)), None)
