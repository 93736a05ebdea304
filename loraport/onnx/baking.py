"""`loraport merge --base model.onnx`: bake adapters into an ONNX model someone else exported.

Baking is an ONNX source and an ONNX sink of the merge engine's one stream: each adapter target is found in
the graph (onnx/locate.py: by name, scope or value, and whether the graph stores it transposed), the deltas are
resolved against the module weight's torch layout (the plan), and `loraport.engine.stream` reads every
initializer the bake rewrites from the model (onnx/initializers.py), merges in fp32, rounds once to the stored
dtype, checks for NaN/Inf as merge does and hands it to the external-data sink (onnx/sink.py), which writes a new
data file next to `out`; inline initializers no adapter touches are kept as they are. Inputs are never modified.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnx
from onnx import TensorProto

from loraport import paths
from loraport.adapter import Adapter
from loraport.errors import BadInputError, OutputError, PlanError
from loraport.onnx.external import ExternalDataWriter
from loraport.onnx.initializers import OnnxGraph
from loraport.onnx.locate import CONV1D_ANY, Site, locate


def bake(base: str, adapters: list[tuple[str, float]], out: str, overwrite: bool = False, strict: bool = True,
         device: str = "auto", reference: str | None = None, manifest: bool = True, hash_cache=True,
         nonfinite: str = "warn") -> dict:
    """Bake adapters into the ONNX model `base`; write `out` (+ `out`.data) and, with `manifest`, the integrity
    manifest `out.manifest.json` listing both files (`loraport verify`). `nonfinite` ("warn" or "fail") as in
    merge. Returns a report dict."""
    from loraport.checkpoint import Checkpoint
    from loraport.engine.device import pick_device
    from loraport.finite import check_adapters, check_mode
    from loraport.formats import load_adapter

    t0 = time.perf_counter()
    mode = check_mode(nonfinite)
    base_p, out_p, data_p = _check_paths(base, adapters, out, overwrite, reference)
    dev = pick_device(device)
    g = _open_graph(base_p, base)
    ref = Checkpoint.open(reference) if reference else None
    loaded: list[tuple[Adapter, float]] = [
        (a if isinstance(a, Adapter) else load_adapter(a, base=ref), float(w)) for a, w in adapters]
    warnings = check_adapters(loaded, mode)
    sites, pending = locate(g, list(dict.fromkeys(d.target for a, _ in loaded for d in a.deltas)), ref)
    if pending and strict:
        shown = ", ".join(pending[:6]) + (f" ... (+{len(pending) - 6} more)" if len(pending) > 6 else "")
        hint = "" if ref is not None else " (pass reference=<the HF folder it was exported from> to match by value)"
        raise PlanError(f"{base}: {len(pending)} adapter target(s) have no initializer in the ONNX model: {shown}"
                        f"{hint}")
    resolved, transposed = _resolve(g, loaded, sites, base)
    stats = _write(g, loaded, resolved, transposed, out_p, data_p, dev, mode, overwrite)
    if ref is not None:
        ref.close()
    man_path = _write_manifest(base_p, _base_files(base_p, g), out_p, data_p, loaded, reference, hash_cache) \
        if manifest else None
    counts = {"name": 0, "scope": 0, "value": 0}
    for s in sites.values():
        counts[s.how] += 1
    return {
        "base": str(base_p), "out": str(out_p), "data": str(data_p), "device": str(dev),
        "adapters": [{"path": a.path, "format": a.format, "weight": w, "targets": len(a.deltas)} for a, w in loaded],
        "initializers": len(g.proto.graph.initializer), "initializers_updated": len(resolved),
        "matched_by": counts, "skipped_targets": pending, "external_data_bytes": stats["bytes"],
        "seconds": round(time.perf_counter() - t0, 3), "manifest": man_path,
        "warnings": warnings + stats["nonfinite"],
    }


def _check_paths(base: str, adapters, out: str, overwrite: bool, reference) -> tuple[Path, Path, Path]:
    """(base, out, out's data file), every refusal before anything is read."""
    from loraport.outputs import check_output

    base_p, out_p = paths.named(base), Path(out)
    if not base_p.is_file():
        raise BadInputError(f"--base {base}: ONNX model not found")
    if out_p.suffix != ".onnx":
        raise OutputError(f"--out {out}: baking writes an .onnx file; give a path ending in .onnx")
    if not adapters:
        raise BadInputError("no --adapter given")
    out_p = check_output(out_p, [base, *[a for a, _ in adapters], reference], overwrite)
    data_p = out_p.parent / (out_p.name + ".data")
    if data_p.exists() and not overwrite:
        raise OutputError(f"{data_p} already exists; pass --overwrite to replace it")
    if data_p.exists() and not out_p.exists():  # a .data file without the model loraport baked: not ours
        raise OutputError(f"{data_p} exists but {out_p.name} does not: --overwrite replaces only a model loraport "
                          "baked; choose another --out or remove it yourself")
    return base_p, out_p, data_p


def _open_graph(base_p: Path, base: str) -> OnnxGraph:
    try:
        return OnnxGraph(base_p)
    except BadInputError:
        raise
    except Exception as e:  # protobuf DecodeError & co
        raise BadInputError(f"--base {base}: not a readable ONNX model ({type(e).__name__})") from None


def _base_files(base_p: Path, g: OnnxGraph) -> list[Path]:
    """The base's own files (the .onnx and the external-data files it names), for the manifest's inputs."""
    return [base_p, *sorted({base_p.parent / e.value for t in g.inits.values() for e in t.external_data
                             if e.key == "location" and ".." not in Path(e.value).parts
                             and not Path(e.value).is_absolute() and (base_p.parent / e.value).is_file()})]


def _resolve(g: OnnxGraph, loaded, sites: dict[str, Site], base: str) -> tuple[dict[str, list], frozenset[str]]:
    """The plan's updates by initializer, each delta resolved against the module weight's torch layout, and the
    initializers stored transposed relative to it (Linear stores W_fn, Conv1D W_fnᵀ)."""
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
    transposed, resolved = set(), {}
    for init, ups in updates.items():
        target = owner[init]
        relation = sites[target].relation
        conv1d = bool(CONV1D_ANY.search(target))
        flip = relation not in ("table", "vector") and (relation == "fnT") != conv1d
        dims = g.dims(init)
        torch_shape = tuple(reversed(dims)) if flip else tuple(dims)
        if flip:
            transposed.add(init)
        resolved[init] = [(d.resolve(torch_shape, "conv1d" if conv1d else None), w) for d, w in ups]
    return resolved, frozenset(transposed)


def _write(g: OnnxGraph, loaded, resolved: dict, transposed: frozenset[str], out_p: Path, data_p: Path, dev,
           mode: str, overwrite: bool) -> dict:
    """The baked model, staged and renamed into place: every initializer an adapter updates or that lives in
    external data goes through the stream into the new data file; inline untouched ones are kept as they are."""
    from loraport.engine.layout import OutEntry
    from loraport.engine.plan import MergePlan
    from loraport.engine.stream import stream
    from loraport.onnx.initializers import InitializerSource
    from loraport.onnx.sink import OnnxDataSink, data_layout
    from loraport.outputs import staged_output

    proto = g.proto
    names = [t.name for t in proto.graph.initializer if t.name in resolved or t.data_location == TensorProto.EXTERNAL]
    source = InitializerSource(g, names, transposed)
    layout = data_layout(data_p.name, [OutEntry(n, n, source.info(n).dtype, tuple(g.dims(n))) for n in names])
    plan = MergePlan(base=source, adapters=loaded, updates=resolved)  # type: ignore[arg-type]
    with staged_output(out_p, is_dir=False, overwrite=overwrite) as stage:
        tmp_data = stage.parent / (stage.name + ".data")  # the pid stays readable: see outputs.owner_pid
        writer = ExternalDataWriter(stage.parent, tmp_data.name)
        writer.location = data_p.name
        sink = OnnxDataSink(writer, layout, transposed)
        try:
            stats = stream(plan, layout, sink, dev, None, None, nonfinite=mode, label="bake")
            inits = [sink.protos[t.name][0] if t.name in sink.protos else t for t in proto.graph.initializer]
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(inits)
            _stamp(proto)
            onnx.save_model(proto, str(stage))
        except BaseException:
            writer.close()
            tmp_data.unlink(missing_ok=True)
            raise
        finally:
            source.close()
        os.replace(tmp_data, data_p)  # atomic; never unlink first (a concurrent bake may be between the two)
    stats["bytes"] = writer.bytes_written
    return stats


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
