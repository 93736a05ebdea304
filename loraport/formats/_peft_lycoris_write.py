"""Writing LoHa / LoKr adapters in PEFT's own form (`peft_type` LOHA / LOKR), so a LyCORIS/kohya or PEFT LoHa or
LoKr converts to PEFT exactly. PEFT rebuilds every factor's shape from the config and the layer, so the config
written here must make PEFT choose the very shapes the tensors have; where no config can, the adapter is
refused (`Inexpressible`). Spec: formats/peft.md ("Other PEFT methods")."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from loraport.adapter import Adapter, Delta
from loraport.errors import BadInputError, Inexpressible
from loraport.safetensors_io import save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def split_dim(dim: int, factor: int) -> tuple[int, int]:
    """How PEFT's LoKr splits a layer width (its `factorization`): (factor, dim/factor) when factor divides it,
    else the divisor pair closest to square with the smaller one at most `factor` (any size for -1)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    cap = dim if factor <= 0 else factor
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= cap)
    return m, dim // m


def _module(d: Delta, what: str) -> str:
    if d.rows is not None or not d.target.endswith(".weight"):
        raise Inexpressible(f"{d.target}: PEFT {what} targets a whole module's .weight")
    if d.has_magnitude or d.transpose:
        raise Inexpressible(f"{d.target}: PEFT {what} has no DoRA magnitude and no transposed (Conv1D-style) form")
    return d.target[: -len(".weight")]


def _loha(d: Delta) -> tuple[dict[str, torch.Tensor], int]:
    if d.t1 is not None:
        raise Inexpressible(f"{d.target}: Tucker (hada_t1/t2) LoHa is not written to PEFT: its "
                            "use_effective_conv2d is one flag for every k×k conv of the model")
    r = int(d.w1b.shape[0])
    if int(d.w2b.shape[0]) != r:
        raise Inexpressible(f"{d.target}: LoHa ranks {r} and {int(d.w2b.shape[0])}; PEFT uses one r per module")
    return {"hada_w1_a": d.w1a, "hada_w1_b": d.w1b, "hada_w2_a": d.w2a, "hada_w2_b": d.w2b}, r


def _lokr_rank(d: Delta, decompose_both: bool) -> int:
    """The r that makes PEFT choose full or decomposed factors exactly as stored."""
    (o1, i1), (o2, i2) = d._w1_shape(), d._w2_shape()[:2]
    ranks = {int(t.shape[1]) for t in (d.w1a, d.w2a) if t is not None}
    if len(ranks) > 1 or d.t2 is not None or len(d._w2_shape()) > 2:
        raise Inexpressible(f"{d.target}: this LoKr (two ranks, a Tucker core or a conv kernel) has no PEFT form")
    r = ranks.pop() if ranks else math.ceil(max(o1, i1, o2, i2) / 2)
    if (r < max(o2, i2) / 2) != (d.w2 is None) or (decompose_both and r < max(o1, i1) / 2) != (d.w1 is None):
        raise Inexpressible(f"{d.target}: PEFT would store this LoKr's factors full/decomposed otherwise (r={r})")
    return r


def _lokr_factor(deltas: list[Delta]) -> int:
    """A decompose_factor under which PEFT splits every layer as the stored Kronecker factors do."""
    shapes = [(d._w1_shape(), d._w2_shape()[:2]) for d in deltas]
    for f in (-1, *sorted({s for (w1, _) in shapes for s in w1})):
        if all(split_dim(a[0] * b[0], f) == (a[0], b[0]) and split_dim(a[1] * b[1], f) == (a[1], b[1])
               for a, b in shapes):
            return f
    raise Inexpressible("no PEFT decompose_factor splits every layer as this LoKr's factors do")


def _lokr(d: Delta, decompose_both: bool) -> tuple[dict[str, torch.Tensor], int]:
    r = _lokr_rank(d, decompose_both)
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    return {k: t for k, t in zip(names, (d.w1, d.w1a, d.w1b, d.w2, d.w2a, d.w2b)) if t is not None}, r


def method_of(adapter: Adapter) -> str | None:
    """"LOHA" / "LOKR" when every update (besides full replacements) is of that kind, else None."""
    kinds = {_METHOD.get(d.kind) for d in adapter.deltas if not d.replaces_base}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


_METHOD = {"loha": "LOHA", "lokr": "LOKR"}


def write_method(adapter: Adapter, path: Path, method: str) -> list[Path]:
    """Write `adapter` (all LoHa or all LoKr, see `method_of`) as a PEFT adapter folder at `path`."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    to_save: list[str] = []
    updates = [d for d in adapter.deltas if not d.replaces_base]
    decompose_both = method == "LOKR" and any(d.w1 is None for d in updates)
    factor = _lokr_factor(updates) if method == "LOKR" else None
    for d in updates:
        mod = _module(d, method)
        parts, r = _loha(d) if method == "LOHA" else _lokr(d, decompose_both)
        tensors.update({f"{PREFIX}{mod}.{k}": t.contiguous() for k, t in parts.items()})
        ranks[mod], alphas[mod] = r, d.scale * r
    for d in adapter.deltas:
        if d.replaces_base:
            if d.rows is not None:
                raise BadInputError(f"{d.target}: a row-sliced replacement has no PEFT form")
            tensors[PREFIX + d.target] = d.value.contiguous()
            to_save.append(d.target.rsplit(".", 1)[0])
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    cfg = {
        "peft_type": method, "task_type": adapter.config.get("task_type") if adapter.format == "peft" else None,
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        "r": r0, "alpha": int(a0) if float(a0).is_integer() else a0,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != a0},
        "target_modules": sorted(ranks), "modules_to_save": sorted(set(to_save)) or None,
        "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True,
        "inference_mode": True,
    }
    if method == "LOKR":
        cfg.update(decompose_both=decompose_both, decompose_factor=factor, rank_dropout_scale=False)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, path / WEIGHTS, {"format": "pt"})
    return [path / CONFIG, path / WEIGHTS]
