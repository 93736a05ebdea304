"""Finding where each adapter target lives in a foreign ONNX model (for `loraport merge --base model.onnx`).

For each adapter target (an HF parameter name) the initializer holding it is found by, in order:
1. name: the initializer is called like the parameter (torch.onnx `optimize=False`, Optimum's embeddings),
   possibly behind a wrapper prefix (`m.model.layers...`);
2. scope: the node that consumes the initializer carries the module path, in the dynamo exporter's
   `pkg.torch.onnx.name_scopes` metadata or in a TorchScript node name (`/model/layers.0/self_attn/q_proj/MatMul`);
3. value: with `reference=` (the HF folder the ONNX model was exported from), the initializer whose bytes equal
   W or Wᵀ.
How the initializer is stored relative to the module's weight (as is, or transposed: `x @ Wᵀ` folded into
the initializer) is read from its consumer (MatMul / Transpose→MatMul / Gemm transB / Gather).
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field

import onnx
import torch

from loraport.checkpoint import CONV1D_LAYERS
from loraport.onnx.external import ONNX_TO_TORCH
from loraport.onnx.initializers import OnnxGraph

CONV1D_ANY = re.compile("|".join(f"(?:{p})" for p in set(CONV1D_LAYERS.values())))
_TS_NODE = re.compile(r"^/(?P<path>.+)/[A-Za-z]+(?:_\d+)?$")  # TorchScript: /model/layers.0/mlp/up_proj/MatMul


@dataclass
class Site:
    """Where a weight lives in the graph: the initializer and whether it stores the module weight transposed
    relative to the function layout W_fn [out, in] (y = x·W_fnᵀ)."""

    init: str
    relation: str  # "fn" (stored = W_fn), "fnT" (stored = W_fnᵀ), "table" (Gather data), "vector" (1-D)
    how: str  # name / scope / value
    consumers: list[str] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _relation(init: str, dims: list[int], cons: dict) -> str | None:
    """How the initializer is used: see Site.relation. None when its uses disagree or are unknown."""
    if len(dims) == 1:
        return "vector"
    rels = set()
    for node, idx in cons.get(init, []):
        op = node.op_type
        if op == "MatMul" and idx == 1:
            rels.add("fnT")
        elif op == "Transpose" and list(_attr(node, "perm", [1, 0])) == [1, 0]:
            inner = {(n.op_type, i) for n, i in cons.get(node.output[0], [])}
            rels.add("fn" if inner and all(o == "MatMul" and i == 1 for o, i in inner) else "?")
        elif op == "Gemm" and idx == 1:
            rels.add("fn" if _attr(node, "transB", 0) else "fnT")
        elif op == "Gather" and idx == 0:
            rels.add("table")
        else:
            rels.add("?")
    if len(rels) == 1 and "?" not in rels:
        return rels.pop()
    if rels == {"fnT", "table"}:  # tied embedding / head: one table, also used as x @ Eᵀ
        return "table"
    return None


def _scope_of(node: onnx.NodeProto) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)  # a repr'd list of str
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and all(isinstance(s, str) for s in scopes):
                return scopes[-2] or None
    m = _TS_NODE.match(node.name or "")
    return m.group("path").replace("/", ".") if m else None


def _suffix_match(path: str, stem: str) -> bool:
    return path == stem or path.endswith("." + stem)


def _by_name(g: OnnxGraph, target: str) -> str | None:
    if target in g.inits:
        return target
    hits = [n for n in g.names if n.endswith("." + target)]
    return hits[0] if len(hits) == 1 else None


def _by_scope(g: OnnxGraph, target: str) -> str | None:
    stem, _, leaf = target.rpartition(".")
    if leaf not in ("weight", "bias") or not stem:
        return None
    found = set()
    for name in g.names:
        if len(g.dims(name)) != (2 if leaf == "weight" else 1):
            continue
        for node, _ in g.cons.get(name, []):
            nodes = [node]
            if node.op_type == "Transpose":
                nodes += [n for n, _ in g.cons.get(node.output[0], [])]
            for n in nodes:
                s = _scope_of(n)
                if s and _suffix_match(s, stem) and (leaf == "weight") == (n.op_type in ("MatMul", "Gemm", "Gather")):
                    found.add(name)
    return found.pop() if len(found) == 1 else None


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _value_index(g: OnnxGraph, shapes: set[tuple[int, ...]]) -> dict[tuple, list[str]]:
    idx: dict[tuple, list[str]] = {}
    for name in g.names:
        d = tuple(g.dims(name))
        if d in shapes:
            t = g.read(name)
            idx.setdefault((d, str(t.dtype), _digest(t)), []).append(name)
    return idx


def locate(g: OnnxGraph, targets: list[str], ref) -> tuple[dict[str, Site], list[str]]:
    """({target: Site}, the targets not found): by name, then scope, then (with the reference folder `ref`)
    by value."""
    sites: dict[str, Site] = {}
    pending: list[str] = []
    for t in targets:
        site = _by_name_or_scope(g, t)
        if site is None:
            pending.append(t)
        else:
            sites[t] = site
    if pending and ref is not None:
        _by_value(g, pending, ref, sites)
    return sites, pending


def _by_name_or_scope(g: OnnxGraph, target: str) -> Site | None:
    for how, fn in (("name", _by_name), ("scope", _by_scope)):
        init = fn(g, target)
        if init:
            rel = _relation(init, g.dims(init), g.cons)
            if rel:
                return Site(init, rel, how)
    return None


def _by_value(g: OnnxGraph, pending: list[str], ref, sites: dict[str, Site]) -> None:
    """Match the `pending` targets by the bytes of the reference's weight (as is or transposed), in every float
    dtype the graph stores; found ones move from `pending` to `sites`."""
    shapes = set()
    for t in pending:
        if t in ref:
            s = tuple(ref.info(t).shape)
            shapes |= {s, tuple(reversed(s))}
    idx = _value_index(g, shapes)
    stored = [ONNX_TO_TORCH.get(d) for d in {g.inits[n].data_type for n in g.names}]
    dtypes = [d for d in stored if d is not None and d.is_floating_point]
    for t in [t for t in pending if t in ref]:
        for tdt in dtypes:
            site = _value_site(g, idx, ref.get(t).to(tdt), tdt)
            if site is not None:
                sites[t] = site
                pending.remove(t)
                break


def _value_site(g: OnnxGraph, idx: dict, W: torch.Tensor, tdt: torch.dtype) -> Site | None:
    for cand in (W, W.t() if W.dim() == 2 else None):
        if cand is None:
            continue
        hits = idx.get((tuple(cand.shape), str(tdt), _digest(cand)), [])
        if hits:
            rel = _relation(hits[0], g.dims(hits[0]), g.cons)
            if rel:
                return Site(hits[0], rel, "value")
    return None
