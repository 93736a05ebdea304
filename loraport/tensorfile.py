"""Load a small tensor file (an adapter) from safetensors or, for legacy files, a *weights-only* pickle.

Pickles are never executed: `torch.load(weights_only=True)` refuses anything but tensors and plain
containers, and that refusal becomes an `UnsafeInputError` naming the file and the safe way out.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import torch

from loraport.errors import BadInputError, UnsafeInputError
from loraport.paths import regular
from loraport.safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file or a weights-only pickle; tensors are CPU copies."""
    p = regular(path)
    if not p.is_file():
        raise BadInputError(f"{p}: file not found")
    if p.suffix == ".safetensors":
        f = SafetensorsFile(p)
        try:
            return f.load_all(), dict(f.metadata)
        finally:
            f.close()
    if p.suffix in PICKLE_SUFFIXES:
        return _load_pickle(p), {}
    raise BadInputError(f"{p}: unknown tensor file type (expected .safetensors, or a .bin/.pt weights-only pickle)")


def _check_zip(p: Path) -> None:
    """torch.save writes its zip records uncompressed; a compressed record in a small file can expand to any
    size in memory (a zip bomb), so refuse it before torch reads it."""
    try:
        if not zipfile.is_zipfile(p):
            return  # legacy (pre-1.6) torch pickle: torch.load reads it sequentially
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as e:
        raise BadInputError(f"{p}: cannot read this pickle file (broken zip: {str(e)[:100]})") from None
    size = p.stat().st_size
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.file_size > size:
            raise UnsafeInputError(f"{p}: refused to load: record {i.filename[:60]!r} is compressed "
                                   f"({i.file_size} bytes unpacked from a {size}-byte file); torch.save never "
                                   "compresses, so this is not a plain checkpoint; convert it to .safetensors")


def _load_pickle(p: Path) -> dict[str, torch.Tensor]:
    _check_zip(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter is not the user's business
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError, RecursionError, ...
        msg = _torch_reason(e)
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "unpickl" in str(e).lower():
            raise UnsafeInputError(
                f"{p}: refused to load: the pickle needs code execution beyond plain tensors ({msg}); "
                "convert it to .safetensors with a tool you trust"
            ) from None
        raise BadInputError(f"{p}: cannot read this pickle file ({msg})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise BadInputError(f"{p}: expected a mapping of names to tensors")
    out = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise BadInputError(f"{p}: no tensors inside")
    return out


def _torch_reason(e: BaseException) -> str:
    """The one informative line of torch.load's multi-paragraph error (which also suggests the unsafe
    weights_only=False; we never do that)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    pick = [x for x in lines if re.search(r"unsupported|blocked|not an allowed", x, re.I)]
    line = m.group(1) if m else (pick or lines or [type(e).__name__])[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()[:200] or type(e).__name__
