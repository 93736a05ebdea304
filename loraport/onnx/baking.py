"""`loraport merge --base model.onnx`: bake adapters into an ONNX model someone else exported.

For each adapter target (an HF parameter name) the initializer holding it is found by, in order:
1. name: the initializer is called like the parameter (torch.onnx `optimize=False`, Optimum's embeddings),
   possibly behind a wrapper prefix (`m.model.layers...`);
2. scope: the node that consumes the initializer carries the module path, in the dynamo exporter's
   `pkg.torch.onnx.name_scopes` metadata or in a TorchScript node name (`/model/layers.0/self_attn/q_proj/MatMul`);
3. value: with `reference=` (the HF folder the ONNX model was exported from), the initializer whose bytes equal
   W or Wᵀ.
How the initializer is stored relative to the module's weight (as is, or transposed: `x @ Wᵀ` folded into
the initializer) is read from its consumer (MatMul / Transpose→MatMul / Gemm transB / Gather). The merged
weight is computed in fp32 with the merge engine's math, rounded once to the stored dtype, and every
initializer is streamed into a new external-data file next to `out`. Inputs are never modified.

Size: finding a foreign graph's initializers (by name, scope, value) and the bake loop; the loop is to
become an ONNX source and sink of the one stream (issue 16).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from loraport import paths
from loraport.adapter import Adapter
from loraport.checkpoint import CONV1D_LAYERS
from loraport.errors import BadInputError, OutputError, PlanError
from loraport.onnx.external import ONNX_TO_TORCH, ExternalDataWriter
from loraport.progress import each

_CONV1D_ANY = re.compile("|".join(f"(?:{p})" for p in set(CONV1D_LAYERS.values())))
_TS_NODE = re.compile(r"^/(?P<path>.+)/[A-Za-z]+(?:_\d+)?$")  # TorchScript: /model/layers.0/mlp/up_proj/MatMul


@dataclass
class Site:
    """Where a weight lives in the graph: the initializer and whether it stores the module weight transposed
    relative to the function layout W_fn [out, in] (y = x·W_fnᵀ)."""

    init: str
    relation: str  # "fn" (stored = W_fn), "fnT" (stored = W_fnᵀ), "table" (Gather data), "vector" (1-D)
    how: str  # name / scope / value
    consumers: list[str] = field(default_factory=list)


def _consumers(g: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    c: dict[str, list] = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            c.setdefault(x, []).append((n, i))
    return c


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


class _Graph:
    def __init__(self, path: Path):
        self.path = path
        self.proto = onnx.load(str(path), load_external_data=False)
        g = self.proto.graph
        self.inits = {t.name: t for t in g.initializer}
        self.cons = _consumers(g)
        self.names = list(self.inits)
        # every external-data file passes the input-path policy before an output is staged (read() checks again)
        locs = {e.value for t in g.initializer if t.data_location == TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}
        for loc in sorted(locs):
            paths.external(path, loc)

    def dims(self, name: str) -> list[int]:
        return list(self.inits[name].dims)

    def read(self, name: str) -> torch.Tensor:
        """One initializer as a CPU tensor (external data memory-mapped, copied); every field checked first."""
        t = self.inits[name]
        where = f"{self.path}: initializer {name[:80]!r}"
        dt = ONNX_TO_TORCH.get(t.data_type)
        dims = [int(d) for d in t.dims]
        n = numel(dims, where)
        if t.data_location == TensorProto.EXTERNAL:
            if dt is None:
                raise BadInputError(f"{where} has ONNX type {t.data_type} loraport cannot read")
            return self._read_external(t, where, dims, dt, n * dt.itemsize)
        nbytes = n * dt.itemsize if dt is not None else None  # (packed 4-bit types: left to onnx's check)
        if nbytes is not None and t.raw_data and len(t.raw_data) != nbytes:
            raise BadInputError(f"{where}: inline data of {len(t.raw_data)} bytes, but {dims} needs {nbytes}")
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001 - onnx raises ValueError/TypeError/KeyError on malformed fields
            raise BadInputError(f"{where}: malformed tensor data ({type(e).__name__}: {str(e)[:100]})") from None
        if t.data_type == TensorProto.BFLOAT16:
            return torch.from_numpy(arr.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(arr))

    def _read_external(self, t, where: str, dims: list[int], dt: torch.dtype, nbytes: int) -> torch.Tensor:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        try:
            f = paths.external(self.path, loc)  # inside the model's folder, after symlinks; a regular file
        except BadInputError as e:
            raise type(e)(f"{e} [external data of {where}]") from None
        off = _field_int(info, "offset", 0, where)
        length = _field_int(info, "length", nbytes, where)
        if length != nbytes or not f.is_file() or off + length > f.stat().st_size:
            raise BadInputError(f"{where}: external data is missing or truncated in {loc[:80]}")
        if not length:
            return torch.empty(dims, dtype=dt)
        mm = np.memmap(f, dtype=np.uint8, mode="r", offset=off, shape=(length,))
        return torch.from_numpy(np.array(mm)).view(dt).reshape(dims)


MAX_NUMEL = 1 << 40  # elements of one initializer (4 TiB of fp32): past that a dims field is corrupt


def numel(dims: list[int], where: str) -> int:
    """Element count of ONNX `dims`, in Python integers (no overflow), refused when negative or absurd."""
    n = 1
    for d in dims:
        if d < 0:
            raise BadInputError(f"{where}: negative dimension in {dims[:8]}")
        n *= d
    if n > MAX_NUMEL:
        raise BadInputError(f"{where}: dims {dims[:8]} hold {n} elements (at most {MAX_NUMEL}); corrupt")
    return n


def _field_int(info: dict, key: str, default: int, where: str) -> int:
    v = info.get(key)
    if v is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", v):
        raise BadInputError(f"{where}: external data {key} {v[:30]!r} is not a non-negative integer")
    return int(v)


def _by_name(g: _Graph, target: str) -> str | None:
    if target in g.inits:
        return target
    hits = [n for n in g.names if n.endswith("." + target)]
    return hits[0] if len(hits) == 1 else None


def _by_scope(g: _Graph, target: str) -> str | None:
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


def _value_index(g: _Graph, shapes: set[tuple[int, ...]]) -> dict[tuple, list[str]]:
    idx: dict[tuple, list[str]] = {}
    for name in g.names:
        d = tuple(g.dims(name))
        if d in shapes:
            t = g.read(name)
            idx.setdefault((d, str(t.dtype), _digest(t)), []).append(name)
    return idx


def bake(base: str, adapters: list[tuple[str, float]], out: str, overwrite: bool = False, strict: bool = True,
         device: str = "auto", reference: str | None = None, manifest: bool = True, hash_cache=True) -> dict:
    """Bake adapters into the ONNX model `base`; write `out` (+ `out`.data) and, with `manifest`, the integrity
    manifest `out.manifest.json` listing both files (`loraport verify`). Returns a report dict."""
    from loraport.checkpoint import Checkpoint
    from loraport.engine.apply import merged_tensor
    from loraport.engine.device import pick_device
    from loraport.engine.plan import MergePlan
    from loraport.formats import load_adapter
    from loraport.outputs import check_output, staged_output

    t0 = time.perf_counter()
    base_p, out_p = paths.named(base), Path(out)
    if not base_p.is_file():
        raise BadInputError(f"--base {base}: ONNX model not found")
    if out_p.suffix != ".onnx":
        raise OutputError(f"--out {out}: baking writes an .onnx file; give a path ending in .onnx")
    if not adapters:
        raise BadInputError("no --adapter given")
    out_p = check_output(out_p, [base, *[a for a, _ in adapters], reference], overwrite)
    data_name = out_p.name + ".data"
    data_p = out_p.parent / data_name
    if data_p.exists() and not overwrite:
        raise OutputError(f"{data_p} already exists; pass --overwrite to replace it")
    if data_p.exists() and not out_p.exists():  # a .data file without the model loraport baked: not ours
        raise OutputError(f"{data_p} exists but {out_p.name} does not: --overwrite replaces only a model loraport "
                          "baked; choose another --out or remove it yourself")
    dev = pick_device(device)
    try:
        g = _Graph(base_p)
    except BadInputError:
        raise
    except Exception as e:  # protobuf DecodeError & co
        raise BadInputError(f"--base {base}: not a readable ONNX model ({type(e).__name__})") from None
    # the base's own files (the .onnx and the external-data files it names), for the manifest's inputs
    base_files = [base_p, *sorted({base_p.parent / e.value for t in g.inits.values() for e in t.external_data
                                   if e.key == "location" and ".." not in Path(e.value).parts
                                   and not Path(e.value).is_absolute() and (base_p.parent / e.value).is_file()})]
    ref = Checkpoint.open(reference) if reference else None
    loaded: list[tuple[Adapter, float]] = [
        (a if isinstance(a, Adapter) else load_adapter(a, base=ref), float(w)) for a, w in adapters]

    # ---- locate every target --------------------------------------------------------------------
    sites: dict[str, Site] = {}
    pending: list[str] = []
    targets = list(dict.fromkeys(d.target for a, _ in loaded for d in a.deltas))
    for t in targets:
        for how, fn in (("name", _by_name), ("scope", _by_scope)):
            init = fn(g, t)
            if init:
                rel = _relation(init, g.dims(init), g.cons)
                if rel:
                    sites[t] = Site(init, rel, how)
                    break
        else:
            pending.append(t)
    if pending and ref is not None:
        shapes = set()
        for t in pending:
            if t in ref:
                s = tuple(ref.info(t).shape)
                shapes |= {s, tuple(reversed(s))}
        idx = _value_index(g, shapes)
        for t in list(pending):
            if t not in ref:
                continue
            for dt in {g.inits[n].data_type for n in g.names}:
                tdt = ONNX_TO_TORCH.get(dt)
                if tdt is None or not tdt.is_floating_point:
                    continue
                W = ref.get(t).to(tdt)
                for cand, _rel in ((W, "as-is"), (W.t() if W.dim() == 2 else None, "T")):
                    if cand is None:
                        continue
                    hits = idx.get((tuple(cand.shape), str(tdt), _digest(cand)), [])
                    if len(hits) >= 1:
                        init = hits[0]
                        rel = _relation(init, g.dims(init), g.cons)
                        if rel:
                            sites[t] = Site(init, rel, "value")
                            pending.remove(t)
                            break
                if t in sites:
                    break
    if pending:
        shown = ", ".join(pending[:6]) + (f" ... (+{len(pending) - 6} more)" if len(pending) > 6 else "")
        hint = "" if ref is not None else " (pass reference=<the HF folder it was exported from> to match by value)"
        if strict:
            raise PlanError(f"{base}: {len(pending)} adapter target(s) have no initializer in the ONNX model: {shown}"
                            f"{hint}")

    # ---- plan: resolve each delta against the module weight's torch layout -----------------------
    updates: dict[str, list] = {}
    owner: dict[str, str] = {}
    for a, w in loaded:
        for d in a.deltas:
            site = sites.get(d.target)
            if site is None:
                continue
            if site.init in owner and owner[site.init] != d.target:
                raise PlanError(f"{base}: initializer {site.init} holds both {owner[site.init]} and {d.target} "
                                "(shared or deduplicated weights); baking would change both")
            owner[site.init] = d.target
            updates.setdefault(site.init, []).append((d, w))
    transposed: dict[str, bool] = {}
    resolved: dict[str, list] = {}
    for init, ups in updates.items():
        target = owner[init]
        site = sites[target]
        conv1d = bool(_CONV1D_ANY.search(target))
        # stored vs the module's torch layout: Linear stores W_fn, Conv1D stores W_fnᵀ
        if site.relation in ("table", "vector"):
            flip = False
        else:
            flip = (site.relation == "fnT") != conv1d
        dims = g.dims(init)
        torch_shape = tuple(reversed(dims)) if flip else tuple(dims)
        transposed[init] = flip
        resolved[init] = [(d.resolve(torch_shape, "conv1d" if conv1d else None), w) for d, w in ups]

    plan = MergePlan(base=None, adapters=loaded, updates=resolved)  # type: ignore[arg-type]

    # ---- stream every initializer into the new data file -----------------------------------------
    proto = g.proto
    new_inits = []
    with staged_output(out_p, is_dir=False, overwrite=overwrite) as stage:
        tmp_data = stage.parent / (stage.name + ".data")  # the pid stays readable: see outputs.owner_pid
        writer = ExternalDataWriter(stage.parent, tmp_data.name)
        writer.location = data_name
        try:
            for t in each(proto.graph.initializer, "bake", count=len(proto.graph.initializer),
                          written=lambda: writer.bytes_written):
                if t.name in resolved:
                    W = g.read(t.name)
                    stored_dtype = W.dtype
                    Wt = W.t() if transposed[t.name] else W
                    M = merged_tensor(plan, t.name, dev, base_tensor=Wt)
                    M = M.t() if transposed[t.name] else M
                    new_inits.append(writer.add(t.name, M.to(stored_dtype).cpu(), t.data_type, list(t.dims)))
                elif t.data_location == TensorProto.EXTERNAL:
                    new_inits.append(writer.add(t.name, g.read(t.name), t.data_type, list(t.dims)))
                else:
                    new_inits.append(t)
        except BaseException:
            writer.close()
            tmp_data.unlink(missing_ok=True)
            raise
        writer.close()
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(new_inits)
        _stamp(proto)
        try:
            onnx.save_model(proto, str(stage))
        except BaseException:
            tmp_data.unlink(missing_ok=True)
            raise
        os.replace(tmp_data, data_p)  # atomic; never unlink first (a concurrent bake may be between the two)
    if ref is not None:
        ref.close()
    man_path = _write_manifest(base_p, base_files, out_p, data_p, loaded, reference, hash_cache) if manifest else None
    counts = {"name": 0, "scope": 0, "value": 0}
    for s in sites.values():
        counts[s.how] += 1
    return {
        "base": str(base_p), "out": str(out_p), "data": str(data_p), "device": str(dev),
        "adapters": [{"path": a.path, "format": a.format, "weight": w, "targets": len(a.deltas)} for a, w in loaded],
        "initializers": len(proto.graph.initializer), "initializers_updated": len(resolved),
        "matched_by": counts, "skipped_targets": pending, "external_data_bytes": writer.bytes_written,
        "seconds": round(time.perf_counter() - t0, 3), "manifest": man_path,
    }


def _stamp(proto) -> None:
    """loraport.version in the model's metadata: lets `--overwrite` recognise a model loraport baked (the
    exporter's producer_name is kept)."""
    from loraport._version import __version__

    for p in proto.metadata_props:
        if p.key == "loraport.version":
            p.value = __version__
            return
    proto.metadata_props.add(key="loraport.version", value=__version__)


def _write_manifest(base: Path, base_files: list[Path], out: Path, data: Path, loaded, reference, hash_cache):
    """`out.manifest.json`: the baked .onnx and its data file, the inputs (the base .onnx, the external-data
    files it names, the adapters, the reference folder) and the plan; written once both files are in place."""
    from loraport import manifest as mf

    inputs = [*base_files, reference, *[a.path for a, _ in loaded]]
    plan = {"to": "onnx-bake", "base": str(base.resolve()), "reference": str(Path(reference).resolve())
            if reference else None, "adapters": [{"path": str(Path(a.path).resolve()), "format": a.format,
                                                  "weight": w, "targets": len(a.deltas)} for a, w in loaded]}
    man = mf.build(out, inputs=mf.input_hashes(inputs, mf.HashCache.of(hash_cache)), plan=plan, name=out.name)
    man["files"][data.name] = {"sha256": mf.sha256_file(data), "size": data.stat().st_size}
    return str(mf.write_sibling(out, man))
