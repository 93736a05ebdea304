"""Widened inputs in the plan: a Flux Control LoRA's input projection (loraport/deltas_widen.py) gets more input
columns. The new shapes, which merges may write them (a float safetensors base, unquantized output: a quantized
or ONNX layout has no place for the new columns), and the model config entries that follow (a diffusers
transformer's in_channels)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from loraport.adapter import Adapter
from loraport.engine.sources import resolve_target
from loraport.errors import PlanError

WHERE = "a float safetensors base (a diffusers folder or a single file) without --quantize"


def widened_shapes(base, adapters: list[tuple[Adapter, float]], allowed: bool) -> dict[str, tuple[int, ...]]:
    """{base tensor: its widened shape}; refuses a widening the merge cannot write, or two that disagree."""
    shapes: dict[str, tuple[int, ...]] = {}
    for a, _ in adapters:
        for d in a.deltas:
            if not d.widens:
                continue
            for name in resolve_target(base, d.target):
                have = tuple(base.info(name).shape)
                new = tuple(d.output_shape(have))
                if new == have:
                    continue
                if not allowed:
                    raise PlanError(f"{a.path}: a control LoRA: it widens {name} from {have[1]} to {new[1]} input "
                                    f"columns, which only a merge into {WHERE} can write")
                if shapes.get(name, new) != new:
                    raise PlanError(f"{name}: the adapters widen it to {shapes[name][1]} and {new[1]} input columns")
                shapes[name] = new
    return shapes


def fit_input(d, have: tuple[int, ...], new: tuple[int, ...]):
    """A delta of another adapter on a tensor the plan widens, sized for the base's width: its update on the old
    columns (what diffusers' _maybe_expand_lora_state_dict does to a LoRA merged into a control model)."""
    s = d.implied_shape()
    if d.widens or d.rows is not None or s is None or tuple(s) != tuple(have) or len(have) != 2:
        return d
    return d.input_padded(new[1]) or d


def config_updates(plan) -> dict[str, dict]:
    """{config.json of the widened tensor's folder (relative path): the entries to set}."""
    out: dict[str, dict] = {}
    for name, ups in plan.updates.items():
        for d, _ in ups:
            if not d.widens or not d.config_key or name not in plan.shapes:
                continue
            shard, _ = plan.base.shard_of(name)
            rel = str(PurePosixPath(shard.relpath).parent / "config.json")
            if rel not in plan.base.extra_files:
                continue  # a single file: the tensor's shape is all there is
            entry = out.setdefault(rel, {})
            entry[d.config_key] = plan.shapes[name][1]
            if d.keep_key:
                entry.setdefault("_keep", {})[d.keep_key] = int(plan.base.info(name).shape[1])
    return out


def write_config_updates(plan, stage: Path) -> list[str]:
    """Apply `config_updates` to the staged copies of the configs; what was changed, for the report."""
    done = []
    for rel, entry in config_updates(plan).items():
        path = stage / rel
        cfg = json.loads(path.read_text(encoding="utf-8"))
        keep = entry.pop("_keep", {})
        for k, v in keep.items():
            if cfg.get(k) is None:  # it defaulted to the widened entry: state the old width
                cfg[k] = v
                done.append(f"{rel}: {k} = {v}")
        for k, v in entry.items():
            done.append(f"{rel}: {k} {cfg.get(k)} → {v}")
            cfg[k] = v
        path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return done
