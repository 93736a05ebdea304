"""Atomic outputs: everything is written into a hidden temporary sibling and renamed into place only when
complete, so an interrupted run leaves either nothing or the previous complete output. Stale temporaries
from killed runs are swept on the next run. Inputs are never written to, and an output may not be, contain
or sit inside an input."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

from loraport.errors import BadInputError, OutputError

TMP_TAG = ".loraport-tmp-"
OLD_TAG = ".loraport-old-"
# written into every folder output that carries no manifest (`--no-manifest`, adapter folders): with the
# manifests it is what lets --overwrite tell loraport's own output from a user's folder
MARKER = ".loraport-output"
FOLDER_PROOFS = ("loraport-manifest.json", "loraport_onnx.json", MARKER)


def _resolved(p: str | Path, role: str) -> Path:
    """`p` with its links followed; a symlink loop (RuntimeError before Python 3.13, OSError after) is the
    user's path, not an internal error."""
    try:
        return Path(p).resolve()
    except (RuntimeError, OSError) as e:
        err = OutputError if role == "--out" else BadInputError
        raise err(f"{role} {p}: cannot follow its symlinks ({e}); point it at a real file or folder") from None


def check_output(out: str | Path, inputs: list[str | Path], overwrite: bool) -> Path:
    """Refuse outputs that would clobber an input or an existing output (without overwrite)."""
    o = _resolved(out, "--out")
    if overwrite:
        _refuse_protected(o, out)
    for i in inputs:
        if i is None:
            continue
        ip = _resolved(i, "input")
        if o == ip:
            raise OutputError(f"--out {out} is the same as the input {i}; choose a new path")
        if ip in o.parents:
            raise OutputError(f"--out {out} is inside the input {i}; choose a path outside it")
        if o in ip.parents:
            raise OutputError(f"--out {out} contains the input {i}; choose another path")
    if o.parent.is_dir():
        sweep_stale(o)  # first: a run killed between its two renames restores the previous output here
    if o.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it")
    if o.exists():
        check_replaceable(o, out)
    if not o.parent.is_dir():
        raise OutputError(f"the folder for --out does not exist: {o.parent}")
    return o


def check_replaceable(o: Path, shown: str | Path) -> None:
    """--overwrite replaces only what loraport wrote: a folder holding its manifest or marker, an empty folder,
    or a file whose sibling manifest or own header says loraport wrote it; never the working directory, one of
    its ancestors, the home folder or /."""
    _refuse_protected(o, shown)
    if o.is_dir():
        if any((o / p).is_file() for p in FOLDER_PROOFS) or not any(o.iterdir()):
            return
        raise OutputError(f"--out {shown} is a folder loraport did not write (no {FOLDER_PROOFS[0]} or {MARKER} "
                          "in it); --overwrite replaces only loraport's outputs: choose a new path or remove it "
                          "yourself")
    if o.is_file() and _file_written_by_loraport(o):
        return
    raise OutputError(f"--out {shown} is a file loraport did not write (no {o.name}.manifest.json beside it, no "
                      "loraport stamp in its header); --overwrite replaces only loraport's outputs: choose a new "
                      "path or remove it yourself")


def _refuse_protected(o: Path, shown: str | Path) -> None:
    cwd, root = Path.cwd().resolve(), Path(o.anchor or "/")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no $HOME and no passwd entry
        home = root
    what = ("/" if o == root else "your home folder" if o == home else "the current folder" if o == cwd
            else "a parent of the current folder" if o in cwd.parents else None)
    if what:
        raise OutputError(f"--out {shown} is {what}; --overwrite never replaces it: choose a new folder")


def _file_written_by_loraport(p: Path) -> bool:
    """A sibling manifest naming the file, or loraport's stamp in the file's own metadata: safetensors
    `__metadata__` key, GGUF key or ONNX producer / metadata_props starting with "loraport"."""
    import json

    try:
        m = json.loads(p.with_name(p.name + ".manifest.json").read_text(encoding="utf-8"))
        if isinstance(m, dict) and str(m.get("schema", "")).startswith("loraport-manifest/") \
                and p.name in (m.get("files") or {}):
            return True
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        pass
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 20)
            if p.suffix == ".safetensors" and len(head) >= 8:
                n = int.from_bytes(head[:8], "little")
                f.seek(8)
                head = f.read(n) if n <= 100 << 20 else b""  # the JSON header (safetensors caps it at 100 MB)
    except OSError:
        return False
    if p.suffix == ".safetensors":
        try:
            meta = json.loads(head).get("__metadata__")
        except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
            return False
        return isinstance(meta, dict) and any(str(k).startswith("loraport") for k in meta)
    if p.suffix == ".gguf":
        return head[:4] == b"GGUF" and GGUF_STAMP in head
    if p.suffix == ".onnx":
        return _onnx_stamped(p)
    return False


GGUF_STAMP = b"loraport.version"  # a GGUF metadata key loraport's writer adds (llama.cpp ignores unknown keys)


def _onnx_stamped(p: Path) -> bool:
    try:
        import onnx

        m = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable: not provably ours
        return False
    return m.producer_name == "loraport" or any(x.key.startswith("loraport") for x in m.metadata_props)


def host_tag() -> str:
    """This machine's name as it appears in temporaries (letters, digits and '-' only): a pid is only
    meaningful on the host that issued it, and workers on several hosts may share one output folder."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "localhost"


def owner_tag(pid: int | None = None) -> str:
    """`<pid>@<host>`: who owns a temporary, as written in its name."""
    return f"{os.getpid() if pid is None else pid}@{host_tag()}"


def stage_path(out: Path, tag: str = TMP_TAG, pid: int | None = None) -> Path:
    """The temporary sibling of `out` that this process (or `pid` on this host) writes into."""
    return out.parent / f".{out.name}{tag}{owner_tag(pid)}"


def owner(name: str, prefix: str) -> tuple[int, str | None] | None:
    """(pid, host) of the process that made a temporary: the part right after `prefix`, up to the end of the
    name or a '.' (a temporary may carry a suffix: a bake's `.<out>.loraport-tmp-<pid>@<host>.data`); host is
    None in names written before hosts were recorded (taken as this host). None: not ours."""
    if not name.startswith(prefix):
        return None
    pid, _, host = name[len(prefix):].split(".", 1)[0].partition("@")
    if not (pid.isascii() and pid.isdigit()) or (_ and not host):
        return None
    return int(pid), host or None


def owner_pid(name: str, prefix: str) -> int | None:
    """The pid of a temporary made on this host (None: not ours, or made on another host, where a pid
    means nothing here)."""
    o = owner(name, prefix)
    return o[0] if o is not None and o[1] in (None, host_tag()) else None


def sweep_stale(out: Path) -> None:
    """Remove temporaries left by killed runs for this output (their pid is gone). A temporary whose owner is
    alive is never touched, whatever its suffix; a name we cannot read a pid from is not ours and stays, and
    so does one made on another host (its pid cannot be checked from here: it may be writing right now)."""
    tmp_prefix, old_prefix = f".{out.name}{TMP_TAG}", f".{out.name}{OLD_TAG}"
    try:
        names = [p.name for p in out.parent.iterdir() if p.name.startswith((tmp_prefix, old_prefix))]
    except OSError:
        return
    for name in sorted(names):
        p = out.parent / name
        pid = owner_pid(name, old_prefix)
        if pid is None or pid_alive(pid):
            continue
        # killed between its two renames (its stage is still there, `out` is gone): the old output is the
        # last complete one. Killed after both renames: `out` is the new output, or the user removed it since;
        # either way the old one is garbage and must not come back.
        if not out.exists() and any((out.parent / f"{tmp_prefix}{t}").exists() for t in (pid, owner_tag(pid))):
            p.rename(out)
        else:
            _remove(p)
    for name in sorted(names):
        pid = owner_pid(name, tmp_prefix)
        if pid is None or pid_alive(pid):
            continue
        _remove(out.parent / name)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def staged_output(out: str | Path, *, is_dir: bool, overwrite: bool = False):
    """Yield a temporary path to write into; on success it replaces `out` atomically, on any failure
    (exception, Ctrl-C, SIGTERM) it is removed and `out` is left as it was."""
    out = Path(out).resolve()
    sweep_stale(out)
    stage = stage_path(out)
    _remove(stage)
    if is_dir:
        stage.mkdir()
    prev = signal.getsignal(signal.SIGTERM)

    def _term(signum, frame):  # turn SIGTERM into an exception so the cleanup below runs
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread
        prev = None
    try:
        yield stage
        if is_dir and not any((stage / p).is_file() for p in FOLDER_PROOFS):
            (stage / MARKER).write_text('{"written_by": "loraport"}\n', encoding="utf-8")
        _fsync_tree(stage)
        if out.exists():
            if not overwrite:
                raise OutputError(f"{out} appeared while writing; not replaced (pass --overwrite)")
            old = stage_path(out, OLD_TAG)
            try:
                os.replace(out, old)
            except FileNotFoundError:  # another run replacing the same output moved it just now
                old = None
            os.replace(stage, out)
            if old is not None:
                _remove(old)
        else:
            os.replace(stage, out)
    except OSError as e:
        _remove(stage)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk filled up mid-write (despite the size check)
            free = shutil.disk_usage(out.parent).free
            raise OutputError(f"no space left on the device while writing {out} ({free} bytes free after "
                              "removing the partial output); free some space or choose another --out") from None
        raise
    except BaseException:
        _remove(stage)
        raise
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def _fsync_tree(p: Path) -> None:
    try:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError:
        pass


def check_free_space(where: Path, needed: int, margin: float = 1.02) -> None:
    free = shutil.disk_usage(where).free
    if needed * margin > free:
        from loraport.console import human_bytes

        raise OutputError(
            f"not enough free space in {where}: the output needs {human_bytes(needed)}, "
            f"{human_bytes(free)} is free"
        )
