"""Plan: every adapter target resolved to exactly one base tensor (or the saved copies of a tied weight), its
orientation fixed against the base shape, and every failure (unmatched targets, shape mismatches, an adapter that
touches nothing) reported before a byte is written."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from loraport.adapter import Adapter, Delta
from loraport.checkpoint import Checkpoint
from loraport.engine.experts import to_base_layout
from loraport.engine.sources import resolve_target
from loraport.engine.vocab import new_shapes, tie_rule
from loraport.engine.widen import fit_input, widened_shapes
from loraport.errors import PlanError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
QUANTIZE_CASTS = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


@dataclass
class MergePlan:
    base: Checkpoint  # the source: Checkpoint or a subclass (loraport.engine.sources); an untied view of it
    adapters: list[tuple[Adapter, float]]
    updates: dict[str, list[tuple[Delta, float]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # output shapes that differ (vocab, widened)
    notes: list[str] = field(default_factory=list)  # decisions the user is told about (an untied head)

    def updated_names(self) -> list[str]:
        return [n for n in self.base.names() if n in self.updates]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The output shape of base tensor `name`."""
        return self.shapes.get(name) or tuple(self.base.info(name).shape)


def build_plan(base: Checkpoint, adapters: list[tuple[Adapter, float]], strict: bool = True,
               tie: str = "keep", resize: bool = False, widen: bool = False) -> MergePlan:
    """`tie`: the --tie-embeddings rule for a tied head (loraport.engine.vocab); `resize`: whether an adapter may
    resize the vocabulary (only a model-folder output can say so in its config.json); `widen`: whether a control
    LoRA may widen an input projection (loraport.engine.widen)."""
    base, adapters, notes = tie_rule(base, adapters, tie)
    wide = widened_shapes(base, adapters, widen)
    plan = MergePlan(base, adapters, shapes={**new_shapes(base, adapters, resize), **wide}, notes=notes)
    for adapter, weight in adapters:
        unmatched, matched = [], 0
        for d in to_base_layout(adapter.deltas, base):  # fused expert updates on a per-expert base: split
            names = resolve_target(base, d.target)
            if not names:
                unmatched.append(d.target)
                continue
            for name in names:
                info = base.info(name)
                if d.rows is not None and not (0 <= d.rows[0] < d.rows[1] <= (info.shape[0] if info.shape else 0)):
                    raise PlanError(f"{adapter.path}: rows {d.rows} of {name} are outside its {list(info.shape)}")
                if info.dtype not in FLOATS:
                    raise PlanError(f"{adapter.path}: {name} is {info.dtype}, not a float tensor; cannot update it"
                                    " (a quantized base needs dequantizing first)")
                fitted = fit_input(d, tuple(info.shape), wide[name]) if name in wide else d
                r = fitted.resolve(plan.shape_of(name), base.layer_hint(name))
                if tuple(r.output_shape(plan.shape_of(name))) != plan.shape_of(name):  # a resize the plan refused
                    raise PlanError(f"{adapter.path}: shape mismatch for {name}: adapter key {d.source_key or '?'} "
                                    f"gives it {list(r.output_shape(plan.shape_of(name)))}, the base tensor is "
                                    f"{list(plan.shape_of(name))}")
                if r.target != name:
                    r = replace(r, target=name)
                plan.updates.setdefault(name, []).append((r, weight))
            matched += 1
        if unmatched:
            shown = ", ".join(unmatched[:8]) + (f" ... (+{len(unmatched) - 8} more)" if len(unmatched) > 8 else "")
            if strict:
                raise PlanError(
                    f"{adapter.path}: {len(unmatched)} of {len(adapter.deltas)} adapter targets have no tensor in "
                    f"the base: {shown} (wrong base model?)"
                ).hint("--no-strict", "merges the rest")
            plan.skipped += unmatched
        if matched == 0:
            raise PlanError(f"{adapter.path}: none of the adapter's {len(adapter.deltas)} targets is in the base "
                            f"(e.g. {adapter.deltas[0].target}); is this the right base model?")
    return plan

