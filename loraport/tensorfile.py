"""Load a small tensor file (an adapter) from safetensors or, for legacy files, a *weights-only* pickle.

Pickles are never executed: `torch.load(weights_only=True)` refuses anything but tensors and plain
containers, and that refusal becomes an `UnsafeInputError` naming the file and the safe way out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraport.errors import BadInputError, UnsafeInputError
from loraport.safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file or a weights-only pickle; tensors are CPU copies."""
    p = Path(path)
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


def _load_pickle(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
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


def read_json(p: str | Path, what: str = "config") -> dict:
    p = Path(p)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{p}: missing {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{p}: invalid JSON in {what} ({e})") from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{p}: {what} must be a JSON object")
    return obj
