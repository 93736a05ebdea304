"""Adapter formats: one module per on-disk format, each registering an `AdapterFormat` subclass with
`@register(...)`, which declares the typed options its reader and (when it has one) its writer take. Modules in
this package are discovered automatically, so adding a format is adding a file (and its spec in the top-level
`formats/<name>.md`). Every list of formats (CLI choices, convert targets, the support matrix) comes from here."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraport.errors import BadInputError

if TYPE_CHECKING:
    from loraport.adapter import Adapter
    from loraport.checkpoint import Checkpoint

_REGISTRY: dict[str, type[AdapterFormat]] = {}
_EXPORTS: dict[str, str] = {}  # convert targets written by loraport.onnx rather than by a format's writer
# output suffixes that make an output one file when a format's layout depends on the path it is given
FILE_SUFFIXES = (".safetensors", ".gguf", ".onnx_adapter", ".pt", ".bin")


# ------------------------------------------------------------------------------------------------ options
def choice(default, *choices):
    """A dataclass field whose value must be one of `choices` (checked when the options are built)."""
    return field(default=default, metadata={"choices": (default, *choices)})


@dataclass(frozen=True)
class ReadOptions:
    """What every reader takes. `strict`: refuse keys it does not recognise and modules the base lacks
    (False: skip them with a note) — honoured by the readers that can skip (kohya, LyCORIS, diffusers).
    `force`: read an adapter whose merge changes what it does (PEFT activated LoRA), with a warning, instead of
    refusing it — honoured by the readers that have such adapters (PEFT); the others have nothing to force."""

    strict: bool = True
    force: bool = False


@dataclass(frozen=True)
class WriteOptions:
    """What every writer takes (nothing yet); formats with options subclass it."""


def option_names(kind: type) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)]


def build_options(kind: type, given: Mapping[str, Any], fmt: str, what: str):
    """`kind(**given)`, refusing an option the format does not declare or a value outside its choices with a
    line that names the valid ones."""
    valid = option_names(kind)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise BadInputError(f"unknown {what} option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                            f"for the {fmt} format; valid: {', '.join(valid) or 'none'}")
    for f in dataclasses.fields(kind):
        if f.name not in given:
            continue
        ch, v = f.metadata.get("choices"), given[f.name]
        if ch and v not in ch:
            raise BadInputError(f"{what} option {f.name}={v!r} for the {fmt} format: use one of "
                                f"{', '.join(map(repr, ch))}")
        if str(f.type) == "bool" and not isinstance(v, bool):
            raise BadInputError(f"{what} option {f.name}={v!r} for the {fmt} format: use True or False")
    return kind(**given)


def parse_option_text(kind: type, items: list[str], fmt: str, what: str) -> dict[str, Any]:
    """Options given as KEY=VALUE strings (the CLI's --read-option / --write-option), typed by the declared
    field (booleans as true/false, numbers as numbers, `none` for an optional value left unset) and checked
    like `build_options`; returns them by name."""
    types = {f.name: str(f.type) for f in dataclasses.fields(kind)}
    given: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise BadInputError(f"{what} option {item!r}: write it as KEY=VALUE")
        given[key] = _typed(text.strip(), types.get(key, "str"), f"{what} option {key}")
    build_options(kind, given, fmt, what)
    return given


def _typed(text: str, typ: str, where: str):
    if "None" in typ and text.lower() in ("none", ""):
        return None
    if typ.startswith("bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise BadInputError(f"{where}: expected true or false, got {text!r}")
    if typ.startswith(("float", "int")):
        try:
            return float(text) if typ.startswith("float") else int(text)
        except ValueError:
            raise BadInputError(f"{where}: expected a number, got {text!r}") from None
    return text


# ------------------------------------------------------------------------------------------------ formats
class AdapterFormat:
    """One on-disk adapter format. Subclasses set the class attributes, implement `detect` and `read_with`
    (and `write_with` when registered with a writer), and are registered with `@register(...)`."""

    name: str = ""
    title: str = ""  # human name for tables
    spec: str = ""  # formats/<spec>.md
    mergeable: bool = True  # loraport merge accepts it
    # where a written adapter goes: a folder (True), one file (False), or by the suffix of the path (None)
    output_is_dir: bool | None = None
    output_suffix: str = ""  # the suffix a one-file output must carry for the low-rank tools ("": any)
    own_naming: tuple[str, ...] = ()  # target prefixes of the format's own naming, kept when read without a base
    extract_to: bool = False  # `loraport extract` writes it (it names any module, linear or conv)
    # set by @register
    readable: bool = True
    writable: bool = False
    read_options: type[ReadOptions] = ReadOptions
    write_options: type[WriteOptions] = WriteOptions

    @classmethod
    def detect(cls, path: Path) -> int:
        """Confidence 0..100 that `path` is in this format (0: certainly not). Must be cheap and never raise."""
        return 0

    @classmethod
    def read(cls, path: Path, base: Checkpoint | None = None, **options) -> Adapter:
        """Read `path` with the reader options given by name (an option the format does not declare is refused)."""
        return cls.read_with(Path(path), base, build_options(cls.read_options, options, cls.name, "read"))

    @classmethod
    def read_with(cls, path: Path, base: Checkpoint | None, opts: ReadOptions) -> Adapter:
        raise NotImplementedError

    @classmethod
    def write(cls, adapter: Adapter, path: Path, base: Checkpoint | None = None, **options) -> list[Path]:
        """Write `adapter` at `path` with the writer options given by name (undeclared ones refused)."""
        if not cls.writable:
            raise BadInputError(f"writing the {cls.name} format is not supported")
        return cls.write_with(adapter, Path(path), base, build_options(cls.write_options, options, cls.name, "write"))

    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base: Checkpoint | None, opts: WriteOptions) -> list[Path]:
        raise NotImplementedError

    @classmethod
    def writes_folder(cls, out: str | Path) -> bool:
        """Whether the output at `out` is a folder (the format's declared layout, else by the path's suffix)."""
        if cls.output_is_dir is not None:
            return cls.output_is_dir
        return Path(out).suffix not in FILE_SUFFIXES


def register(cls: type[AdapterFormat] | None = None, *, read: type[ReadOptions] = ReadOptions,
             write: type[WriteOptions] | None = None):
    """Class decorator: register a format with its reader's options type and, when it can be written, its
    writer's (`@register(write=WriteOptions)`). Bare `@register` registers a read-only format."""

    def add(c: type[AdapterFormat]) -> type[AdapterFormat]:
        if not c.name:
            raise TypeError(f"{c.__name__} has no name")
        for kind, base in ((read, ReadOptions), (write, WriteOptions)):
            if kind is not None and not (dataclasses.is_dataclass(kind) and issubclass(kind, base)
                                         and kind.__dataclass_params__.frozen):
                raise TypeError(f"{c.__name__}: {kind!r} is not a frozen dataclass subclassing {base.__name__}")
        if write is not None and c.write_with.__func__ is AdapterFormat.write_with.__func__:
            raise TypeError(f"{c.__name__} is registered with a writer but has no write_with")
        c.read_options = read
        c.write_options = write or WriteOptions
        c.writable = write is not None
        _REGISTRY[c.name] = c
        return c

    return add if cls is None else add(cls)


def register_export(name: str, title: str) -> None:
    """A convert target that loraport.onnx writes (an ONNX model, an .onnx_adapter), not a format's writer."""
    _EXPORTS[name] = title


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


def export_targets() -> dict[str, str]:
    """Convert targets written by the ONNX exporter (name → what is written)."""
    _load_all()
    return dict(sorted(_EXPORTS.items()))


def convert_targets() -> list[str]:
    """Every `--to` that `loraport convert` takes: the writable formats, then the ONNX exports."""
    writable = [n for n, f in formats().items() if f.writable]
    return writable + [n for n in export_targets() if n not in writable]


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
