"""Shared output helpers for commands: rich tables/progress on stderr, JSON on stdout."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(description: str, total: float | None, enabled: bool = True):
    """A rich progress bar on stderr; yields `advance(n)`. Silent when disabled or stderr is not a terminal."""
    if not enabled or not err.is_terminal:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def parse_size(s: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    from loraport.errors import BadInputError

    t = s.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "B": 1}
    num, mul = t, 1
    for u, m in units.items():
        if t.endswith(u):
            num, mul = t[: -len(u)], m
            break
    try:
        v = float(num)
    except ValueError:
        raise BadInputError(f"cannot read size {s!r} (try e.g. 5GB or 500MB)") from None
    if v <= 0:
        raise BadInputError(f"size must be positive: {s!r}")
    return int(v * mul)
