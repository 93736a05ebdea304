"""Helpers for the LLM-format tests: PEFT as the oracle (live merge_and_unload on the tiny fixture bases) and
loraport's own dense deltas through the merge plan."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLM = ROOT / "fixtures" / "llm"
LLAMA = LLM / "bases" / "llama"
MOE = LLM / "bases" / "qwen2moe"


@functools.cache
def peft_deltas(adapter: str, base: str = str(LLAMA)) -> dict[str, torch.Tensor]:
    """ΔW per base tensor as PEFT itself merges the adapter (merged − base, fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    after = merged.state_dict()
    return {k: (after[k].float() - before[k].float()) for k in before
            if k in after and not torch.equal(after[k], before[k])}


def loraport_deltas(adapter, base_dir: Path = LLAMA) -> dict[str, torch.Tensor]:
    """ΔW per base tensor as loraport's merge plan applies `adapter` (an Adapter or a path)."""
    from loraport.checkpoint import Checkpoint
    from loraport.formats import load_adapter
    from loraport.merging import build_plan, merged_tensor

    ck = Checkpoint.open(base_dir)
    try:
        ad = load_adapter(adapter, base=ck) if isinstance(adapter, (str, Path)) else adapter
        plan = build_plan(ck, [(ad, 1.0)])
        return {n: merged_tensor(plan, n) - ck.get(n).float() for n in plan.updated_names()}
    finally:
        ck.close()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k] - b[k]).abs().max()) for k in a)
