"""Remembered graphs: an export of an architecture loraport has captured before skips the capture.

A captured graph (loraport/onnx/capture.py) holds no weights: it is a function of config.json, the export
options (dtype, opset, multi-LoRA slots, KV cache) and the code that traced it (torch, transformers, onnxscript,
onnx_ir, onnx and loraport's own capture modules). A CI job exporting the same base with a new adapter every
night, or an export repeated with another adapter or quantization, traces the very same graph each time; the
trace is most of an export's time on small models and its imports (transformers' modeling code, torch.export,
onnxscript: ~0.2 GB resident) most of its memory. So the graph is kept after a capture and read back on the
next export whose key matches; the weights are streamed as always.

Key: sha256 of the canonical JSON of {config.json, dtype, opset, LoRA slot shapes, with_past, the versions of
torch / transformers / onnxscript / onnx-ir / onnx / loraport, sha256 of the capture modules' source}. Any
upgrade or edit changes the key; nothing is ever invalidated by hand.

Entry: `<cache root>/graphs/<key>/` (cache root: loraport.manifest.cache_root()) with `graph.onnx` (the
initializer-free ModelProto as captured, before the export adds weights), `buffers.safetensors` (the small
computed buffers, e.g. rotary inv_freq) and `meta.json` (the rest of `Captured`, plus each file's size and
sha256). An entry is written to a temporary folder and renamed into place, so readers never see half of one.
A missing, truncated, altered or unreadable entry is a miss (it is removed and captured anew): the cache can
make an export faster, never make it fail. At most MAX_ENTRIES are kept, least recently used dropped.

Off switches: `loraport convert --to onnx --recapture` (trace again and refresh the entry) and
`LORAPORT_NO_GRAPH_CACHE=1` (neither read nor write). The graph is data (protobuf + safetensors), never code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from loraport.onnx.capture import Captured, InitSpec, LoraSlot

SCHEMA = "loraport-graph-cache/1"
MAX_ENTRIES = 32
GRAPH, BUFFERS, META = "graph.onnx", "buffers.safetensors", "meta.json"
# the modules whose code shapes a captured graph (their source is part of the key)
_CODE = ("capture.py", "replicate.py", "past.py", "graph_cache.py")
_DISTS = ("torch", "transformers", "onnxscript", "onnx-ir", "onnx")


def disabled() -> bool:
    return os.environ.get("LORAPORT_NO_GRAPH_CACHE", "") not in ("", "0")


def folder() -> Path:
    from loraport.manifest import cache_root

    return cache_root() / "graphs"


def _versions() -> dict[str, str]:
    from loraport import __version__

    out = {"loraport": __version__, "torch-runtime": torch.__version__}
    for d in _DISTS:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = "absent"
    return out


def _code_digest() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _CODE:
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return h.hexdigest()


def key(config: dict, dtype: str, opset: int, lora_targets: dict | None, with_past: bool) -> str:
    """The cache key of a capture (see the module docstring)."""
    payload = {
        "schema": SCHEMA, "config": config, "dtype": dtype, "opset": int(opset), "with_past": bool(with_past),
        "lora_targets": sorted([k, [int(x) for x in v]] for k, v in lora_targets.items()) if lora_targets else None,
        "versions": _versions(), "code": _code_digest(),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(k: str) -> Captured | None:
    """The captured graph stored under key `k`, or None (absent, or damaged: then removed)."""
    entry = folder() / k
    if not (entry / META).is_file():
        return None
    try:
        cap = _read(entry, k)
    except Exception:  # noqa: BLE001 - any damage at all is a miss, never an error
        cap = None
    if cap is None:
        shutil.rmtree(entry, ignore_errors=True)
        return None
    try:
        os.utime(entry / META)  # recently used: kept longest
    except OSError:
        pass
    return cap


def _read(entry: Path, k: str) -> Captured | None:
    import onnx

    from loraport.safetensors_io import SafetensorsFile

    meta = json.loads((entry / META).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA or meta.get("key") != k:
        return None
    files = meta["files"]
    blobs = {}
    for name in (GRAPH, BUFFERS):
        data = (entry / name).read_bytes()
        if len(data) != int(files[name]["size"]) or _sha(data) != files[name]["sha256"]:
            return None
        blobs[name] = data
    proto = onnx.ModelProto()
    proto.ParseFromString(blobs[GRAPH])
    bufs = SafetensorsFile(entry / BUFFERS).load_all()
    inits = [InitSpec(str(n), int(dt), tuple(int(d) for d in shape)) for n, dt, shape in meta["inits"]]
    slots = [LoraSlot(str(m), str(t), int(i), int(o)) for m, t, i, o in meta["lora_slots"]]
    strs = lambda xs: [str(x) for x in xs]  # noqa: E731
    if set(bufs) != set(meta["buffers"]):
        return None
    return Captured(proto, inits, bufs, strs(meta["input_names"]), str(meta["model_type"]), strs(meta["notes"]),
                    slots, strs(meta["output_names"]), bool(meta["with_past"]))


def store(k: str, cap: Captured) -> bool:
    """Remember `cap` under key `k` (call right after the capture, before the export changes cap.proto).
    Best effort: False when it could not be written (read-only or full disk...), and nothing is left behind."""
    from loraport.safetensors_io import save_file

    root = folder()
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        graph = cap.proto.SerializeToString()
        (tmp / GRAPH).write_bytes(graph)
        save_file({n: t.detach().contiguous().cpu() for n, t in cap.buffers.items()}, tmp / BUFFERS)
        bufs = (tmp / BUFFERS).read_bytes()
        meta = {
            "schema": SCHEMA, "key": k,
            "files": {GRAPH: {"size": len(graph), "sha256": _sha(graph)},
                      BUFFERS: {"size": len(bufs), "sha256": _sha(bufs)}},
            "inits": [[i.name, i.onnx_dtype, list(i.shape)] for i in cap.inits],
            "buffers": sorted(cap.buffers),
            "lora_slots": [[s.module, s.target, s.d_in, s.d_out] for s in cap.lora_slots],
            "input_names": cap.input_names, "output_names": cap.output_names, "model_type": cap.model_type,
            "notes": cap.notes, "with_past": cap.with_past,
        }
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        final = root / k
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process stored the same key meanwhile: theirs is as good
            return final.is_dir()
        tmp = None
        _prune(root)
        return True
    except Exception:  # noqa: BLE001 - a cache that cannot be written only costs the next export time
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path) -> None:
    entries = []
    for p in root.iterdir():
        if p.name.startswith(".tmp-"):  # a writer that died: gone after an hour
            try:
                if time.time() - p.stat().st_mtime > 3600:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
            continue
        try:
            entries.append(((p / META).stat().st_mtime, p))
        except OSError:
            entries.append((0.0, p))
    entries.sort(reverse=True)
    for _, p in entries[MAX_ENTRIES:]:
        shutil.rmtree(p, ignore_errors=True)
