"""Writers that store experts their own way (GGUF `ffn_*_exps`, MLX SwitchLinear) meet PEFT `target_parameters`
updates of transformers' fused expert parameters: split per expert through the name table, then restacked."""

from __future__ import annotations

from dataclasses import replace

from loraport.adapter import Adapter
from loraport.engine.experts import per_expert
from loraport.errors import BadInputError


def unstack_fused(adapter: Adapter, base, fmt: str) -> Adapter:
    """For writers that store experts their own way (GGUF `ffn_*_exps`, MLX SwitchLinear): updates of
    transformers' fused expert parameters (PEFT target_parameters; a name without `.weight`) as per-expert HF
    LoRAs the writer restacks; refused where the name table has no per-expert form for the family."""
    if not any(d.stacked and not d.target.endswith(".weight") for d in adapter.deltas):
        return adapter
    out = []
    for d in adapter.deltas:
        if d.stacked and not d.target.endswith(".weight"):
            split = per_expert(d, base, need_base_names=False)
            if split is None:
                why = "pass --base so the model family decides" if base is None else \
                    "this family's fused experts have no per-expert form in loraport/names/llm.py"
                raise BadInputError(f"{fmt} cannot express the update of the fused expert parameter {d.target}: "
                                    f"{why}")
            out += split
        else:
            out.append(d)
    return replace(adapter, deltas=out)
