"""Where a checkpoint tensor lives in the model transformers builds from it: the same parameter, the parameter
under another spelling of its prefix (a bare model, a multimodal text tower), or one expert's rows of a fused
expert parameter (transformers ≥ 5 holds a MoE layer's experts as one `[E, out, in]` parameter while
`save_pretrained` writes them per expert). validate's reference applies adapters to the live model through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from loraport.engine.sources import _candidates
from loraport.names.llm import expert_index, translate

_LAYERS = re.compile(r"^(?P<prefix>.*?)(?P<rest>layers\.\d+\..+)$")


@dataclass(frozen=True)
class Slot:
    module: torch.nn.Module
    leaf: str  # the parameter's name in `module`
    index: tuple[int, int, int] | None = None  # (expert, first row, row after the last) of a fused parameter


def _direct(mods: dict, prefix: str, name: str) -> Slot | None:
    for cand in _candidates(name) + ([f"{prefix}.{name}"] if prefix else []):
        mod_name, _, leaf = cand.rpartition(".")
        m = mods.get(mod_name)
        if m is not None and isinstance(getattr(m, leaf, None), torch.nn.Parameter):
            return Slot(m, leaf)
    return None


def find(model, ckpt_name: str) -> Slot | None:
    """The parameter (or fused-expert slice) of `model` that holds the checkpoint tensor `ckpt_name`, or None."""
    mods = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    hit = _direct(mods, prefix, ckpt_name)
    m = _LAYERS.match(ckpt_name)
    if hit is not None or m is None:
        return hit
    body = "model." + m.group("rest")  # the name table's spelling
    stacked, e = translate(body, "hf", "hf_stacked", experts=True), expert_index(body)
    if stacked is None or e is None:
        return None
    name, _, part = stacked.partition(":")
    hit = _direct(mods, prefix, m.group("prefix") + name[len("model."):])
    if hit is None or getattr(hit.module, hit.leaf).dim() != 3:
        return None
    rows = getattr(hit.module, hit.leaf).shape[1]
    if part:
        half = rows // 2
        return Slot(hit.module, hit.leaf, (e, int(part) * half, (int(part) + 1) * half))
    return Slot(hit.module, hit.leaf, (e, 0, rows))
