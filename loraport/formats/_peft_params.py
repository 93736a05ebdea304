"""PEFT `target_parameters` LoRA (lora.ParamWrapper, PEFT ≥ 0.17): LoRA on a module's nn.Parameter instead of
on a Linear — how the fused 3-D experts of transformers ≥ 5 MoE models (Qwen3-MoE, Mixtral, Llama 4, gpt-oss,
GLM MoE: `experts.gate_up_proj`, `experts.down_proj`) are fine-tuned. Spec: formats/peft.md.

What PEFT 0.21 stores and merges (peft/tuners/lora/layer.py, ParamWrapper):
* a parameter P [E, d1, d2] gets lora_A [E·r, d2] and lora_B [d1, E·r]; expert e owns rows e·r … e·r+r-1 of A
  and columns e, E+e, 2E+e, … of B (B is read as [d1, r, E]); ΔP[e] = scale · B_e @ A_e, shape [d1, d2],
  scale = alpha/r (alpha/√r with rsLoRA), r the per-expert rank of the config. A module transformers declares
  `is_transposed` (gpt-oss: P is [E, in, out]) gets lora_A [E·r, d1], lora_B [d2, E·r] and ΔP[e] = (B_e @ A_e)ᵀ;
  Llama 4 also keeps [E, in, out] but is not so declared, so PEFT's math there is the positional default.
* a 2-D parameter is a plain LoRA: ΔP = scale · B @ A.
* k parameters on one module nest k wrappers: the first one PEFT wraps (the module's parameters in definition
  order: gate_up_proj before down_proj) ends innermost, its keys carrying k-1 `base_layer.` segments
  (`experts.base_layer.lora_A.weight` = gate_up_proj), the last none (`experts.lora_A.weight` = down_proj).
  The saved `target_parameters` list does not tell: PEFT keeps it as a set, so its order changes from run to
  run. Against a base the shapes decide (fused or per expert); without one, the definition order above.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch

from loraport.adapter import LoraDelta
from loraport.deltas_experts import ExpertPart, ExpertsLoraDelta
from loraport.engine.experts import stacked_shape
from loraport.errors import BadInputError

NEST = ".base_layer"
# the order transformers 5 expert modules define their parameters (Qwen3-MoE, Mixtral, gpt-oss, Llama 4): the
# order PEFT wraps them in, so the first is the innermost wrapper (the saved target_parameters list is a set's order)
DEFINITION_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
# model types whose expert modules are declared `is_transposed` ([E, in, out]; transformers 5.25's
# @use_experts_implementation): PEFT then stores lora_A [E·r, d1], lora_B [d2, E·r] and ΔP[e] = (B_e @ A_e)ᵀ.
# Only consulted where the parameter is square (shapes decide otherwise).
TRANSPOSED_EXPERTS = ("gpt_oss", "aria", "ergo", "openai_privacy_filter")


def _owner(mod: str) -> tuple[str, int]:
    """`x.experts.base_layer.base_layer` -> (`x.experts`, 2)."""
    depth = 0
    while mod.endswith(NEST):
        mod, depth = mod[: -len(NEST)], depth + 1
    return mod, depth


def _targeted(owner: str, targets: list[str]) -> list[str]:
    """The parameter names of `owner` that `target_parameters` names (PEFT's match: equal or a dotted suffix),
    in the config's order."""
    out = []
    for t in targets:
        param = t.rpartition(".")[2]
        key = f"{owner}.{param}"
        if (key == t or key.endswith("." + t)) and param not in out:
            out.append(param)
    return out


def _orientation(base, target: str, A: torch.Tensor, B: torch.Tensor) -> bool | None:
    """Whether PEFT stored the parameter's update transposed (an `is_transposed` expert module: ΔP[e] =
    (B_e @ A_e)ᵀ); None when the factors fit the base parameter neither way. Without a base: not transposed."""
    shape = stacked_shape(base, target)
    if shape is None:
        return False
    d = tuple(shape[-2:])
    plain, flipped = d == (B.shape[0], A.shape[1]), d == (A.shape[1], B.shape[0])
    if plain and flipped:  # square: only the model class can tell
        return (base.model_type() or "") in TRANSPOSED_EXPERTS
    return False if plain else True if flipped else None


def _nesting(params: list[str]) -> list[str]:
    """A module's targeted parameters innermost first: the order the module defines them."""
    known = [p for p in DEFINITION_ORDER if p in params]
    return known + [p for p in params if p not in known]


def _assign(owner: str, params: list[str], groups: dict[int, dict], base, where: Path, notes: list[str]):
    """depth -> parameter name for one module's nested key sets."""
    if sorted(groups) != list(range(len(params))):
        raise BadInputError(f"{where}: {owner} has LoRA key sets at base_layer depths {sorted(groups)} but "
                            f"target_parameters names {params} on it; cannot tell which parameter each belongs to")
    first = list(reversed(_nesting(params)))  # depth 0 = the outermost wrapper = the last one wrapped
    if base is None:
        if len(params) > 1 and any(p not in DEFINITION_ORDER for p in params):
            raise BadInputError(f"{where}: {owner}: which of {params} each nested key set belongs to depends on "
                                "the model class; pass --base so their shapes decide")
        return dict(enumerate(first))
    for order in [first] + [list(p) for p in itertools.permutations(params)]:
        if all(_orientation(base, f"{owner}.{order[d]}", g["lora_A.weight"], g["lora_B.weight"]) is not None
               for d, g in groups.items()):
            if order != first:
                notes.append(f"{owner}: parameters assigned to key sets by their shapes in the base")
            return dict(enumerate(order))
    raise BadInputError(f"{where}: the LoRA factors on {owner} fit none of its parameters {params} in the base "
                        "(wrong base model?)")


def param_deltas(parts: dict[str, dict[str, torch.Tensor]], cfg: dict, base, where: Path,
                 scale_of: Callable[[str], tuple[float, float, int]], notes: list[str]) -> list:
    """Take the key sets of `target_parameters` wrappers out of `parts` (module -> role -> tensor, as the PEFT
    reader sorted them) and return their deltas. `scale_of(parameter name)` gives (scale, alpha, r) from the
    config's rank/alpha patterns (PEFT looks them up by the parameter's name)."""
    targets = cfg.get("target_parameters") or []
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise BadInputError(f"{where}: target_parameters must be a list of parameter names, got {targets!r}")
    if not targets:
        return []
    by_owner: dict[str, dict[int, dict]] = {}
    for mod in list(parts):
        owner, depth = _owner(mod)
        if _targeted(owner, targets):
            by_owner.setdefault(owner, {})[depth] = parts.pop(mod)
    deltas = []
    for owner, groups in by_owner.items():
        for g in groups.values():
            if "lora_A.weight" not in g or "lora_B.weight" not in g or len(g) != 2:
                raise BadInputError(f"{where}: {owner}: a target_parameters LoRA has exactly lora_A.weight and "
                                    f"lora_B.weight, found {sorted(g)}")
            if g["lora_A.weight"].dim() != 2 or g["lora_B.weight"].dim() != 2:
                raise BadInputError(f"{where}: {owner}: target_parameters LoRA factors are matrices, found "
                                    f"{list(g['lora_A.weight'].shape)} / {list(g['lora_B.weight'].shape)}")
        order = _assign(owner, _targeted(owner, targets), groups, base, where, notes)
        for depth, g in groups.items():
            name = f"{owner}.{order[depth]}"
            A, B = g["lora_A.weight"], g["lora_B.weight"]
            deltas.append(_delta(name, A, B, scale_of(name), where, bool(_orientation(base, name, A, B))))
    return deltas


def _delta(name: str, A: torch.Tensor, B: torch.Tensor, sar: tuple[float, float, int], where: Path,
           transposed: bool):
    scale, alpha, r = sar
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or r <= 0 or A.shape[0] % r:
        raise BadInputError(f"{where}: {name}: lora_A {list(A.shape)} / lora_B {list(B.shape)} are not "
                            f"[experts·r, in] / [out, experts·r] for r={r}")
    E = A.shape[0] // r
    key = f"base_model.model.{name}"
    if E == 1:
        return LoraDelta(name, A=A, B=B, scale=scale, transpose=False, alpha=alpha, layer="linear", source_key=key)
    A3 = A.reshape(E, r, A.shape[1])
    B3 = B.reshape(B.shape[0], r, E).permute(2, 0, 1).contiguous()
    if transposed:  # ΔP[e] = (B_e @ A_e)ᵀ = A_eᵀ @ B_eᵀ
        A3, B3 = B3.transpose(1, 2).contiguous(), A3.transpose(1, 2).contiguous()
    return ExpertsLoraDelta(name, parts=[ExpertPart(A3, B3, scale, None, key)], source_key=key)


# --- writing ------------------------------------------------------------------------------------------------
def _one_lora(d: ExpertsLoraDelta) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A stacked update as one per-expert LoRA (A [E, R, in], B [E, out, R], scale): parts on row slices (gate
    and up of a fused gate_up) become a block-diagonal B over their concatenated ranks, scales baked into B."""
    p0 = d.parts[0]
    if len(d.parts) == 1 and p0.out_rows is None:
        return p0.A, p0.B, p0.scale
    E = p0.A.shape[0]
    rows = [p.out_rows or (0, p.B.shape[1]) for p in d.parts]
    out = max(b for _, b in rows)
    A = torch.cat([p.A for p in d.parts], dim=1)
    B = torch.zeros(E, out, A.shape[1], dtype=p0.B.dtype)
    k = 0
    for p, (a, b) in zip(d.parts, rows):
        r = p.A.shape[1]
        B[:, a:b, k:k + r] = (p.B.float() * (p.scale / p0.scale)).to(B.dtype)
        k += r
    return A, B, p0.scale


def param_tensors(deltas: list[ExpertsLoraDelta], base, prefix: str, rank_pattern: dict, alpha_pattern: dict
                  ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT `target_parameters` keys for stacked updates of fused parameters (the reader's mirror image): per
    module, wrappers nested in definition order; rank and alpha of each parameter into the patterns (keyed by
    the parameter's name). Returns (tensors, target_parameters)."""
    if base is None:
        raise BadInputError(f"{deltas[0].target}: writing PEFT target_parameters needs --base (the nesting and "
                            "orientation of the factors depend on the model class)")
    by_owner: dict[str, list[str]] = {}
    for d in deltas:
        owner, _, param = d.target.rpartition(".")
        by_owner.setdefault(owner, []).append(param)
    tensors: dict[str, torch.Tensor] = {}
    for d in deltas:
        owner, _, param = d.target.rpartition(".")
        order = _nesting(by_owner[owner])
        depth = len(order) - 1 - order.index(param)
        A, B, scale = _one_lora(d)
        if (base.model_type() or "") in TRANSPOSED_EXPERTS:  # an is_transposed module: ΔP[e] = (B_e @ A_e)ᵀ
            A, B = B.transpose(1, 2), A.transpose(1, 2)
        E, R = A.shape[0], A.shape[1]
        key = f"{prefix}{owner}{NEST * depth}"
        tensors[f"{key}.lora_A.weight"] = A.reshape(E * R, A.shape[2]).contiguous()
        tensors[f"{key}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], R * E).contiguous()
        rank_pattern[d.target] = R
        alpha_pattern[d.target] = scale * R
    return tensors, sorted(d.target for d in deltas)
