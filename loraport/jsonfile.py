"""Capped JSON loading for every config, index and metadata string an input carries (no torch: the manifest
and the CLI use it too)."""

from __future__ import annotations

import json
from pathlib import Path

from loraport.errors import BadInputError
from loraport.paths import regular

MAX_JSON = 32 << 20  # bytes: configs, indexes and metadata JSON are kilobytes to a few megabytes


def loads_json(text: str | bytes, where: str, what: str = "config"):
    """Parse JSON from a file or a metadata string, capped at MAX_JSON bytes (any top-level type)."""
    if len(text) > MAX_JSON:
        raise BadInputError(f"{where}: {what} is {len(text)} bytes of JSON (at most {MAX_JSON}); refused")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, over-long integers
        raise BadInputError(f"{where}: invalid JSON in {what} ({str(e)[:120]})") from None
    except RecursionError:
        raise BadInputError(f"{where}: invalid JSON in {what} (nested too deeply)") from None


def read_json(p: str | Path, what: str = "config") -> dict:
    """A JSON object from a file, refused past MAX_JSON bytes before anything is read; the file must be a
    regular one (`paths.regular`: never a FIFO, device or /proc file)."""
    p = regular(p)
    try:
        if p.stat().st_size > MAX_JSON:
            raise BadInputError(f"{p}: {what} is {p.stat().st_size} bytes of JSON (at most {MAX_JSON}); refused")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{p}: missing {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{p}: invalid JSON in {what} ({str(e)[:120]})") from None
    obj = loads_json(text, str(p), what)
    if not isinstance(obj, dict):
        raise BadInputError(f"{p}: {what} must be a JSON object")
    return obj
