"""Stacked expert updates meet the base's expert layout (a name fall-back of the sources, used by the plan).

transformers ≥ 5 holds a MoE layer's experts fused in memory (`mlp.experts.gate_up_proj` [E, 2·I, H],
`mlp.experts.down_proj` [E, H, I]) while `save_pretrained` writes Qwen-MoE / Mixtral experts back per expert
(`mlp.experts.N.gate_proj.weight`, `block_sparse_moe.experts.N.w1.weight`). A delta on the fused parameter must
land on the tensors the base file really has; the per-expert names of each fused parameter are rows of the
name table (`hf_stacked` ↔ `hf`, loraport/names/llm.py), `:i` being the i-th half of the fused output rows.
"""

from __future__ import annotations

import re

from loraport.adapter import LoraDelta
from loraport.deltas_experts import ExpertsLoraDelta
from loraport.engine.sources import resolve_target
from loraport.names.llm import canonical, spell

_LAYERS = re.compile(r"^(?P<prefix>.*?)(?P<rest>layers\.\d+\..+)$")


def _templates(stacked: str, part: str, base) -> list[tuple[str, bool]]:
    """The per-expert HF name templates (`{xid}`) of one part of a stacked tensor, each with whether its row of
    the table is for the base's model family (the base's family first; all False without a base)."""
    m = _LAYERS.match(stacked)
    if m is None:
        return []
    keys = canonical("model." + m.group("rest") + part, "hf_stacked", experts=True)
    family = (base.model_type() or "").replace("_", "") if base is not None else ""
    found = [(t, family in k.row.families.split()) for k in keys if (t := spell(k, "hf")) is not None]
    return sorted(found, key=lambda tf: not tf[1])


def stacked_shape(base, target: str) -> tuple[int, ...] | None:
    """The shape of a fused parameter as the base stores it: fused, or per expert ([E, Σ part rows, in] from
    expert 0's tensors); None without a base or when it has neither."""
    if base is None:
        return None
    names = resolve_target(base, target)
    if names:
        return tuple(base.info(names[0]).shape)
    parts = [":0", ":1"] if target.endswith("gate_up_proj") else [""]
    shapes = []
    for part in parts:
        found = [n[0] for t, _ in _templates(target, part, base)
                 if len(n := resolve_target(base, t.format(xid=0))) == 1]
        if not found:
            return None
        shapes.append(tuple(base.info(found[0]).shape))
    if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
        return None
    return (0, sum(s[0] for s in shapes), shapes[0][1])


def _parts(d: ExpertsLoraDelta) -> list[str] | None:
    """The name-table parts one stacked update covers: "" (all rows) or ":0"/":1" (gate/up halves)."""
    if len(d.parts) != 1 or d.parts[0].out_rows is not None:
        return None
    return [":0", ":1"] if d.target.endswith("gate_up_proj") else [""]


def per_expert(d: ExpertsLoraDelta, base=None, *, need_base_names: bool = True) -> list[LoraDelta] | None:
    """The per-expert LoRAs of a stacked update on a transformers-5 fused parameter, named as the base stores
    them (`need_base_names`: only if the base has them, else None), or in the table's spelling for the base's
    family (without a base: the table's only spelling); None when the name table has no per-expert form for it
    (gpt-oss's interleaved [E, in, out] gate_up shares Qwen's name but not its layout: the family decides)."""
    parts = _parts(d)
    if parts is None:
        return None
    p = d.parts[0]
    E, out, _ = p.B.shape
    half = out // len(parts)
    deltas = []
    for i, part in enumerate(parts):
        chosen = None
        templates = _templates(d.target, part, base)
        for t, ours in templates:
            names = [resolve_target(base, t.format(xid=e)) if base is not None else [] for e in range(E)]
            if all(len(n) == 1 for n in names):  # the base stores exactly these: whatever the family
                chosen = [n[0] for n in names]
                break
            if chosen is None and not need_base_names and (ours or base is None and len(templates) == 1):
                chosen = [t.format(xid=e) for e in range(E)]
        if chosen is None:
            return None
        for e, name in enumerate(chosen):
            deltas.append(LoraDelta(name, A=p.A[e], B=p.B[e, i * half:(i + 1) * half], scale=p.scale,
                                    transpose=False, layer="linear", scale_rule="alpha/r",
                                    source_key=f"{p.source_key}[{e}]"))
    return deltas


def to_base_layout(deltas: list, base) -> list:
    """Stacked updates whose fused tensor the base lacks but whose per-expert tensors it has, split per expert;
    everything else as it is (the plan reports what the base has not)."""
    if base is None:
        return deltas
    out = []
    for d in deltas:
        if d.stacked and not resolve_target(base, d.target):
            split = per_expert(d, base)
            if split is not None:
                out += split
                continue
        out.append(d)
    return out
