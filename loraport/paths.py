"""The input-path policy: which files inside an input folder (a base model, an adapter, an ONNX model's
external data) loraport may open.

An input folder is untrusted: whoever publishes "a LoRA" or "a base model" chooses its symlinks. So

* a file inside an input folder must resolve (realpath) inside that folder; when the folder is a Hugging Face
  cache snapshot (`<cache>/models--org--name/snapshots/<rev>/...`, every file a symlink into the repo's
  store), inside that repo's own `blobs/` folder too — nowhere else. Anything else is refused with one line
  naming the file and where it points: a symlink out of the folder would copy (side files, ONNX external data)
  or hash any file this user can read into the output;
* special files (FIFOs, sockets, devices) and kernel pseudo-files (anything under /proc or /sys) are never
  opened: reading one can block forever or never end. A folder walk skips them (nothing needs them); a file
  the merge needs is refused;
* a file the user names on the command line may be a symlink anywhere (users symlink models) but must still
  resolve to a regular file.

The checks are a realpath and a stat per file: no reads, no hashing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from loraport.errors import UnsafeInputError

PSEUDO_ROOTS = ("/proc", "/sys")  # kernel pseudo-file systems: "regular" files of endless or changing size
HF_REPO_PREFIX = "models--"


def _under(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _special(st: os.stat_result) -> str | None:
    """What a non-regular, non-folder file is ("a FIFO", ...); None for a regular file or a folder."""
    m = st.st_mode
    if stat.S_ISREG(m) or stat.S_ISDIR(m):
        return None
    if stat.S_ISFIFO(m):
        return "a FIFO"
    if stat.S_ISSOCK(m):
        return "a socket"
    if stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return "a device"
    return "not a regular file"


def regular(path: str | Path) -> Path:
    """`path`, once sure that opening it cannot block or read forever: refused when it resolves to a special
    file or under /proc or /sys. A missing file or a folder passes (the caller reports those its own way)."""
    p = Path(path)
    real = os.path.realpath(p)
    if any(_under(real, r) for r in PSEUDO_ROOTS):
        raise UnsafeInputError(f"{p}: refused: it resolves to {real}, a kernel pseudo-file, not a model file")
    try:
        st = os.stat(real)
    except OSError:
        return p
    kind = _special(st)
    if kind:
        raise UnsafeInputError(f"{p}: refused: it is {kind}, not a regular file (never opened: reading it could "
                               "block forever)")
    return p


def identity(path: str | Path) -> Path:
    """`path` with its links followed, for telling paths apart (a batch's outputs, jobs grouped by base); one
    whose links cannot be followed (a symlink loop: RuntimeError before Python 3.13, OSError after) stays as
    written, made absolute — the command that uses it then refuses it in one line, and a batch's other jobs run."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


def named(path: str | Path) -> Path:
    """A path the user named directly: may be a symlink, but must resolve to a regular file or a folder."""
    return regular(path)


def roots(folder: str | Path) -> tuple[str, ...]:
    """Where the files of the input folder `folder` may resolve: the folder itself (real path) and, for a
    Hugging Face cache snapshot (or a folder inside one), that repo's `blobs/` store."""
    real = os.path.realpath(folder)
    parts = Path(real).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(HF_REPO_PREFIX):
            return real, os.path.realpath(os.path.join(*parts[:i], "blobs"))
    return (real,)


def _check_real(p: Path, real: str, folder: str | Path, allowed: tuple[str, ...]) -> None:
    """Refuse `p` (resolving to `real`) unless `real` lies inside the allowed roots of the input `folder`."""
    if any(_under(real, r) for r in allowed):
        return
    if any(_under(real, r) for r in PSEUDO_ROOTS):
        raise UnsafeInputError(f"{p}: refused: it points to {real}, a kernel pseudo-file, not a model file")
    where = f"the input folder {folder}" + (" and its Hugging Face blobs/ store" if len(allowed) > 1 else "")
    raise UnsafeInputError(f"{p}: refused: it points to {real}, outside {where} (copy the file into the folder "
                           "if it really belongs to the model)")


def member(folder: str | Path, path: str | Path, allowed: tuple[str, ...] | None = None) -> Path:
    """`path`, a file inside the input folder `folder`, once sure it resolves inside the folder (or its
    Hugging Face blobs/ store) and is not a special file."""
    p = Path(path)
    _check_real(p, os.path.realpath(p), folder, allowed or roots(folder))
    return regular(p)


def walk(folder: str | Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every regular file under the input folder `folder`, sorted. A symlink (file
    or folder) resolving outside the allowed roots is refused; special files are skipped without being
    opened; dangling symlinks are skipped; a symlinked folder inside the roots is walked once."""
    root = Path(folder)
    allowed = roots(root)
    if any(_under(allowed[0], x) for x in PSEUDO_ROOTS):
        raise UnsafeInputError(f"{root}: refused: it resolves to {allowed[0]}, a kernel pseudo-file system")
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    todo, linked = [(root, "")], []  # real folders first: a folder reached by a link too is listed by its own path
    while todo or linked:
        d, rel = todo.pop() if todo else linked.pop()
        real_d = os.path.realpath(d)
        if real_d in seen:
            continue
        seen.add(real_d)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            p, r = Path(e.path), rel + e.name
            try:
                st = os.stat(p)  # follows symlinks
            except OSError:
                continue  # dangling symlink or vanished: nothing to read
            if e.is_symlink():
                _check_real(p, os.path.realpath(p), folder, allowed)
            if stat.S_ISDIR(st.st_mode):
                (linked if e.is_symlink() else todo).append((p, r + "/"))
            elif stat.S_ISREG(st.st_mode):  # FIFOs, sockets, devices: skipped, never opened
                out.append((r, p))
    out.sort(key=lambda x: x[0].split("/"))
    return out


def check_folder(folder: str | Path) -> None:
    """Refuse an input folder holding a symlink that leaves it (before any reader looks inside)."""
    walk(folder)


def entry(path: str | Path) -> Path:
    """An input (adapter or base) as named by the user: a folder is checked whole (`check_folder`), a file
    must resolve to a regular file."""
    p = named(path)
    if p.is_dir():
        check_folder(p)
    return p



def external(model: str | Path, location: str) -> Path:
    """The file an ONNX initializer's external-data `location` names, relative to the model `model`: a plain
    relative path that resolves inside the model's folder (symlinks included) to a regular file."""
    m = Path(model)
    loc = Path(location)
    if not location or loc.is_absolute() or ".." in loc.parts or "\x00" in location:
        raise UnsafeInputError(f"{m}: refused: external data location {location!r} is not a path inside the "
                               "model's folder")
    return member(m.parent, m.parent / loc)
