"""The README's architecture matrix (architectures × merge, GGUF, MLX, torchtune), built from the name tables
so it cannot drift from them (tests/test_gguf_archs.py compares the README's block with `arch_matrix()`).

merge works by tensor name on any Hugging Face safetensors model; GGUF needs a row in `gguf_map.ARCHS` (names
from gguf-py's TensorNameMap); MLX keeps HF module paths inside the blocks (mlx-lm mirrors them) and stacks
experts only for the families `llm.EXPERTS` spells; torchtune needs Meta's names, which `llm.TENSORS` spells for
the families torchtune's own checkpoint converters cover.
"""

from __future__ import annotations

from loraport.names.gguf_map import ARCHS
from loraport.names.llm import EXPERTS

TORCHTUNE = ("llama", "mistral", "qwen2")  # torchtune convert_weights: Meta names, q/k permuted for llama/mistral
# model types whose GGUF adapters tests/test_gguf_archs.py checks bit-exact against llama.cpp's own
# convert_lora_to_gguf.py (the others follow the same map and the converter's class for them, read not run)
ORACLE_CHECKED = ("deepseek_v2", "deepseek_v3", "gemma2", "gemma3_text", "glm", "glm4", "gpt_oss", "granite",
                  "llama", "llama4_text", "olmo2", "phi3", "smollm3", "starcoder2")
_MOE = ("mixtral", "moe", "gpt_oss", "llama4", "deepseek", "phimoe", "olmoe")


def _gguf(mt: str) -> str:
    a = ARCHS[mt]
    notes = (["q/k rows permuted"] if a.permute else []) + [f"not {m.rsplit('.', 1)[-1]}" for m in a.no_lora]
    if _moe(mt) and not _spelled_experts(mt):
        notes.append("not experts")
    mark = " ✓" if mt in ORACLE_CHECKED else ""
    return f"`{a.gguf}`{mark}" + (f" ({', '.join(notes)})" if notes else "")


def _moe(mt: str) -> bool:
    return any(k in mt for k in _MOE)


def _spelled_experts(mt: str) -> bool:
    return mt.replace("_", "") in {f for r in EXPERTS for f in r.families.split()}


def _mlx(mt: str) -> str:
    if _spelled_experts(mt):
        return "yes (experts as SwitchLinear)"
    return "yes (not experts)" if _moe(mt) else "yes"


def arch_matrix() -> str:
    rows = ["| HF model_type | merge | GGUF (llama.cpp arch) | MLX | torchtune |", "|---|---|---|---|---|"]
    for mt in sorted(ARCHS):
        rows.append(f"| `{mt}` | yes | {_gguf(mt)} | {_mlx(mt)} | {'yes' if mt in TORCHTUNE else '—'} |")
    return "\n".join(rows)
