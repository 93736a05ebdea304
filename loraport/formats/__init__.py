"""Adapter formats: one module per on-disk format, each registering an `AdapterFormat` subclass with
`@register`. Modules in this package are discovered automatically, so adding a format is adding a file
(and its spec in the top-level `formats/<name>.md`)."""

from __future__ import annotations

import importlib
import pkgutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from loraport.errors import BadInputError

if TYPE_CHECKING:
    from loraport.adapter import Adapter
    from loraport.checkpoint import Checkpoint

_REGISTRY: dict[str, type[AdapterFormat]] = {}


class AdapterFormat:
    """One on-disk adapter format. Subclasses set the class attributes and implement `detect` and `read`
    (and `write` where the format can be written)."""

    name: str = ""
    title: str = ""  # human name for tables
    spec: str = ""  # formats/<spec>.md
    readable: bool = True
    writable: bool = False
    mergeable: bool = True  # loraport merge accepts it

    @classmethod
    def detect(cls, path: Path) -> int:
        """Confidence 0..100 that `path` is in this format (0: certainly not). Must be cheap and never raise."""
        return 0

    @classmethod
    def read(cls, path: Path, base: Checkpoint | None = None, **options) -> Adapter:
        raise NotImplementedError

    @classmethod
    def write(cls, adapter: Adapter, path: Path, base: Checkpoint | None = None, **options) -> list[Path]:
        raise BadInputError(f"writing the {cls.name} format is not supported")


def register(cls: type[AdapterFormat]) -> type[AdapterFormat]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


_loaded = False
_load_lock = threading.RLock()


def _load_all() -> None:
    """Import every format module once. Thread-safe: a merge reads several adapters side by side, and a
    second thread must not see the registry while the first is still filling it."""
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        for m in pkgutil.iter_modules(__path__):
            if not m.name.startswith("_"):
                importlib.import_module(f"{__name__}.{m.name}")
        _loaded = True


def formats() -> dict[str, type[AdapterFormat]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_format(name: str) -> type[AdapterFormat]:
    fmts = formats()
    if name not in fmts:
        raise BadInputError(f"unknown format {name!r}; known: {', '.join(fmts)}")
    return fmts[name]


def detect(path: str | Path) -> type[AdapterFormat]:
    from loraport.paths import entry

    p = Path(path)
    if not p.exists():
        raise BadInputError(f"adapter not found: {p}")
    entry(p)  # before any probe opens a file: no FIFO, /proc file or symlink out of the folder
    scored = sorted(((_safe_detect(f, p), n) for n, f in formats().items()), reverse=True)
    if not scored or scored[0][0] <= 0:
        raise BadInputError(
            f"{p}: not a recognised adapter (tried {', '.join(formats())}); pass --format to force one"
        )
    return formats()[scored[0][1]]


def _safe_detect(fmt: type[AdapterFormat], p: Path) -> int:
    """Detection is a guess over untrusted files: a format whose probe fails simply does not claim the file."""
    try:
        return int(fmt.detect(p))
    except Exception:  # noqa: BLE001 - any probe failure means "not this format"
        return 0


def load_adapter(path: str | Path, format: str | None = None, base: Checkpoint | None = None, **options) -> Adapter:
    """Read an adapter from `path` (format auto-detected unless given). `base`, when known, lets readers
    whose keys only make sense against a base (kohya, GGUF) name their targets in the base's naming."""
    from loraport.paths import entry

    if not format:
        fmt = detect(path)  # checks the input-path policy first
    else:
        fmt = get_format(format)
        if Path(path).exists():
            entry(path)  # the input-path policy (loraport/paths.py), whatever reader follows
    adapter = fmt.read(Path(path), base=base, **options)
    if not adapter.deltas:
        raise BadInputError(f"{path}: the adapter has no tensors that loraport can apply")
    return adapter


def support_matrix() -> str:
    """The README's support matrix (format × read / write / merge), generated from the registry."""
    yes, no = "yes", "—"
    rows = ["| format | name | read | write | merge | spec |", "|---|---|---|---|---|---|"]
    for name, f in formats().items():
        rows.append(f"| {f.title or name} | `{name}` | {yes if f.readable else no} | {yes if f.writable else no} | "
                    f"{yes if f.mergeable and f.readable else no} | [formats/{f.spec or name}.md]"
                    f"(formats/{f.spec or name}.md) |")
    return "\n".join(rows)
