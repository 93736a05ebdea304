"""Flux Control LoRAs (BFL's Canny / Depth LoRAs, `flux1-canny-dev-lora.safetensors`) in the diffusers-format
reader: besides LoRA factors (with `lora_B.bias`, read as an additive bias update like PEFT's lora_bias) the file
carries full tensors that replace the base's (the qk-norm scales, a family's `params` rows), and its LoRA on the
input projection (`img_in` / `x_embedder`) takes more inputs than the base's weight (the control image's latents
beside the noise's): the base is widened with zero columns (loraport/deltas_widen.py), as diffusers'
FluxControlPipeline does, and the merged model's input contract changes — said as a warning by every merge and
in `inspect`. Spec: formats/dit.md (Flux Control)."""

from __future__ import annotations

import torch

from loraport.adapter import Delta, ReplaceDelta
from loraport.deltas_widen import WidenDelta
from loraport.errors import BadInputError
from loraport.formats._dit import DitNames
from loraport.names import dit

PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")


def _bare(key: str) -> str:
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def replacements(names: DitNames, tensors: dict[str, torch.Tensor], where
                 ) -> tuple[list[Delta], list[str], list[str]]:
    """(a ReplaceDelta per full tensor the family's params table knows, the keys it does not know, the keys it
    knows that the base lacks)."""
    column = names.column if names.base is not None else "diffusers"
    out: list[Delta] = []
    unknown, unmatched = [], []
    for key, t in tensors.items():
        name = dit.param_name(names.family, _bare(key), column)
        if name is None:
            unknown.append(key)
            continue
        target = (names.prefix if names.base is not None else "transformer.") + name
        if names.base is not None and target not in names.base:
            unmatched.append(key)
            continue
        if not t.is_floating_point():
            raise BadInputError(f"{where}: {key} is {t.dtype}, not a float tensor")
        out.append(ReplaceDelta(target, value=t, source_key=key))
    return out, unknown, unmatched


def widen(names: DitNames, deltas: list[Delta], where) -> tuple[list[Delta], dict | None, list[str]]:
    """(the deltas with a WidenDelta before a LoRA on the input projection whose A takes more inputs than the
    base's weight, what inspect reports about it, the merge's warnings)."""
    spec = names.input_target()
    lora = [d for d in deltas if spec and d.target == spec[0] and d.has_lora_factors and d.implied_shape()]
    if not lora:
        return deltas, None, []
    target, key, keep = spec  # type: ignore[misc]
    width = max(int(d.implied_shape()[1]) for d in lora)
    have = tuple(names.base.info(target).shape) if names.base is not None and target in names.base else None
    info = {"input": target, "input_columns": width, "base_columns": have[1] if have else None}
    if have is None or len(have) != 2 or width <= have[1]:
        return deltas, info, []
    w = WidenDelta(target, columns=width, config_key=key, keep_key=keep, source_key=lora[0].source_key)
    warning = (f"{where}: a control LoRA: {target} is widened from {have[1]} to {width} input columns (zeros for "
               f"the control image's latents); the merged model takes {width} input channels, not {have[1]}: "
               "load it in a control pipeline (diffusers FluxControlPipeline, ComfyUI)")
    return [w, *deltas], info, [warning]


def note(replaced: int, info: dict | None) -> str | None:
    """inspect's line about a control LoRA, None when the file is not one."""
    wider = bool(info) and info["base_columns"] is not None and info["input_columns"] > info["base_columns"]
    if not replaced and not wider:
        return None
    parts = [f"Flux Control LoRA: {replaced} full tensor(s) replace the base's (qk-norm scales)"]
    if info:
        base = f" (the base's: {info['base_columns']})" if info["base_columns"] is not None else ""
        parts.append(f"its {info['input']} LoRA takes {info['input_columns']} input columns{base}; a narrower "
                     "base is widened with zero columns and the merged model's input contract changes")
    return "; ".join(parts)


def read_control(names: DitNames, deltas: list[Delta], leftovers: dict[str, torch.Tensor], where):
    """The reader's one call: (deltas with the replacements and any widening, keys still unrecognised, full-tensor
    keys the base lacks, warnings, the `control` entry of the family summary or None, inspect's note or None)."""
    full, unknown, unmatched = replacements(names, leftovers, where)
    deltas, info, warnings = widen(names, deltas + full, where)
    line = note(len(full), info)
    summary = None if line is None else {"replaces": len(full), **(info or {})}
    return deltas, unknown, unmatched, warnings, summary, line
