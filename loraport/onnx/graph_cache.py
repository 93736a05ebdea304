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

Entry: `<cache root>/graphs/<key>/` (cache root: loraport.cache_key.cache_root()) with `graph.onnx` (the
initializer-free ModelProto as captured, before the export adds weights), `buffers.safetensors` (the small
computed buffers, e.g. rotary inv_freq) and `meta.json` (the rest of `Captured`, plus each file's size and
sha256) and `mac`: an HMAC-SHA256 of the rest of the meta with the user's key (loraport/cache_key.py). An entry
is written to a temporary folder (`.loraport-tmp-<pid>-...`) and renamed into place, so readers never see half
of one. A missing, truncated, altered or unreadable entry is a miss (captured anew), and so is one whose meta
fails the HMAC: a graph swapped in by whoever can write the cache folder, with a self-consistent meta, is never
used. The cache can make an export faster, never make it fail. At most MAX_ENTRIES are kept, least recently used
dropped; only entries that verify are ever pruned or cleared (anything else in the folder is not ours).

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
from pathlib import Path

import torch

from loraport import cache_key
from loraport.onnx.captured import Captured, InitSpec, LoraSlot

SCHEMA = "loraport-graph-cache/2"
TMP_PREFIX = ".loraport-tmp-"
MAX_ENTRIES = 32
GRAPH, BUFFERS, META = "graph.onnx", "buffers.safetensors", "meta.json"
# the modules whose code shapes a captured graph (their source is part of the key)
_CODE = ("capture.py", "captured.py", "replicate.py", "past.py", "graph_cache.py")
_DISTS = ("torch", "transformers", "onnxscript", "onnx-ir", "onnx")


def disabled() -> bool:
    """Off by LORAPORT_NO_GRAPH_CACHE, or when the user's cache key is unusable (cache_key.load warns)."""
    return os.environ.get("LORAPORT_NO_GRAPH_CACHE", "") not in ("", "0") or cache_key.load() is None


def folder() -> Path:
    return cache_key.cache_root() / "graphs"


def _versions() -> dict[str, str]:
    from loraport._version import __version__

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


def verified_meta(entry: Path, secret: bytes, k: str | None = None) -> dict | None:
    """The meta of `entry` when its HMAC verifies with `secret` (and it is stored under its own key), else None."""
    try:
        if entry.is_symlink() or (entry / META).stat().st_size > 16 << 20:
            return None
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA or meta.get("key") != (k or entry.name):
        return None
    body = {n: v for n, v in meta.items() if n != "mac"}
    return meta if cache_key.verify(secret, SCHEMA, body, meta.get("mac")) else None


def load(k: str) -> Captured | None:
    """The captured graph stored under key `k`, or None (absent, damaged or not authenticated)."""
    secret = cache_key.load()
    if secret is None:
        return None
    entry = folder() / k
    meta = verified_meta(entry, secret, k)
    if meta is None:
        return None  # absent, or not ours: a capture replaces it
    try:
        cap = _read(entry, meta)
    except Exception:  # noqa: BLE001 - any damage at all is a miss, never an error
        cap = None
    if cap is None:  # ours (the meta verifies) but damaged
        shutil.rmtree(entry, ignore_errors=True)
        return None
    try:
        os.utime(entry / META)  # recently used: kept longest
    except OSError:
        pass
    return cap


def _read(entry: Path, meta: dict) -> Captured | None:
    import onnx

    from loraport.safetensors_io import SafetensorsFile

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


def cache_shaped(p: Path) -> bool:
    """A real folder holding nothing but files with an entry's names: safe to replace (a forged or foreign entry
    at our key's path); a user's folder or file is never removed."""
    try:
        return (not p.is_symlink() and p.is_dir()
                and all(c.name in (GRAPH, BUFFERS, META) and c.is_file() and not c.is_symlink() for c in p.iterdir()))
    except OSError:
        return False


def owner_pid(name: str) -> int | None:
    """The writer's pid in a temporary folder's name (`.loraport-tmp-<pid>-<random>`), else None."""
    if not name.startswith(TMP_PREFIX):
        return None
    pid = name[len(TMP_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isascii() and pid.isdigit() else None


def store(k: str, cap: Captured) -> bool:
    """Remember `cap` under key `k` (call right after the capture, before the export changes cap.proto).
    Best effort: False when it could not be written (read-only or full disk, no usable key, a folder of the
    user's own at that path...), and nothing is left behind."""
    from loraport.safetensors_io import save_file

    secret = cache_key.load()
    if secret is None:
        return False
    root = folder()
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=root))
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
        meta["mac"] = cache_key.mac(secret, SCHEMA, meta)
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        final = root / k
        if final.exists() or final.is_symlink():
            if not cache_shaped(final):
                return False  # not an entry of ours: left alone
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process stored the same key meanwhile: theirs is as good
            return final.is_dir()
        tmp = None
        _prune(root, secret)
        return True
    except Exception:  # noqa: BLE001 - a cache that cannot be written only costs the next export time
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def stale_tmp(p: Path) -> bool:
    """A temporary folder of a writer that died (its pid is gone); a live writer's is never touched."""
    from loraport.outputs import pid_alive

    pid = owner_pid(p.name)
    return pid is not None and not pid_alive(pid) and cache_shaped(p)


def _prune(root: Path, secret: bytes) -> None:
    entries = []
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            if stale_tmp(p):
                shutil.rmtree(p, ignore_errors=True)
            continue
        if verified_meta(p, secret) is None:
            continue  # not ours (a user's file, a foreign entry): never pruned
        try:
            entries.append(((p / META).stat().st_mtime, p))
        except OSError:
            continue
    entries.sort(reverse=True)
    for _, p in entries[MAX_ENTRIES:]:
        shutil.rmtree(p, ignore_errors=True)
