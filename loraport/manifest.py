"""Integrity manifests: what an output holds (sha256 and size of every file), what it was made from (the
inputs' sha256) and how (the plan summary), so `loraport verify OUT` can tell later whether an output is still
exactly what loraport wrote.

Where: a folder output carries `loraport-manifest.json` inside it (written into the staged folder, so it is
renamed into place with the rest); a single-file output gets a sibling `<name>.manifest.json`, itself written
to a temporary and renamed (atomic on its own; a run killed between the two renames leaves the previous
manifest, which `verify` then reports as a mismatch rather than silently passing).

Size: manifests, the input-hash cache (`HashCache`, ~90 lines) and background hashing share the file
identity and sha256 helpers; `HashCache` is the piece that can move out on its own.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import threading
import time
from pathlib import Path

from loraport import paths as policy  # the input-path policy (`paths` is a parameter name below)
from loraport._version import __version__
from loraport.cache_key import cache_root
from loraport.errors import BadInputError, LoraportError, UnsafeInputError
from loraport.progress import current as progress_reporter
from loraport.progress import each, step
from loraport.jsonfile import MAX_JSON

FOLDER_MANIFEST = "loraport-manifest.json"
SCHEMA = "loraport-manifest/1"


class VerifyFailed(LoraportError):
    """The output no longer matches its manifest."""

    exit_code = 1


MMAP_MIN = 64 << 20  # files this big are hashed from a memory map (no copy through a read buffer: ~13% less CPU)


def sha256_file(path: str | Path, bufsize: int = 4 << 20) -> str:
    h = hashlib.sha256()
    # never a FIFO, device or /proc file (reading one blocks or never ends): refused before opening, and the
    # open itself does not block (O_NONBLOCK), so a file swapped for a FIFO in between is caught by fstat
    fd = os.open(policy.regular(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeInputError(f"{path}: refused: not a regular file (never read: reading it could block forever)")
    with open(fd, "rb") as f:
        size = st.st_size
        if size >= MMAP_MIN:
            try:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # not mappable (a pipe, a special file system): read it
                m = None
            if m is not None:
                with m:
                    advise = hasattr(m, "madvise")
                    if advise:
                        m.madvise(mmap.MADV_SEQUENTIAL)
                    mv = memoryview(m)
                    drop = advise and hasattr(mmap, "MADV_DONTNEED")
                    try:
                        for off in range(0, len(m), bufsize):
                            n = min(bufsize, len(m) - off)
                            h.update(mv[off:off + n])  # hashlib releases the GIL on big buffers
                            if drop:  # unmap what was hashed (the page cache keeps it): RSS stays one chunk
                                m.madvise(mmap.MADV_DONTNEED, off, n)
                    finally:
                        mv.release()
                return h.hexdigest()
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ hash cache
# Hashing the inputs is most of what the manifest costs (a 4 GB base: ~3 CPU-seconds of sha256), and users merge
# adapter after adapter into the same base. So the sha256 of an input file is remembered across runs, keyed by the
# file's identity: real path, device, inode, size, mtime and ctime in nanoseconds. Any write to the file changes
# its ctime (which, unlike mtime, cannot be set back by a user), so a changed file is hashed again. As in git's
# racy-index rule, a digest is only remembered for a file whose ctime lies RACY_SECONDS before the hash started:
# a write within the same timestamp tick as the one we saw could otherwise go unnoticed.
# The file carries an HMAC of its entries with the user's key (loraport/cache_key.py): a file that fails it
# (forged, or restored from elsewhere) is ignored as a whole and replaced, so a manifest never records a digest
# someone else wrote. `verify --check-inputs` never uses the cache: it exists to re-read the bytes.
CACHE_SCHEMA = "loraport-sha256-cache/2"
CACHE_FILE = "sha256-cache.json"
CACHE_MAX = 4096  # entries kept (least recently used dropped)
RACY_SECONDS = 2.0


def cache_dir() -> Path | None:
    """Where the hash cache lives (`cache_root()`); None when LORAPORT_NO_HASH_CACHE is set (to anything but
    0/empty)."""
    if os.environ.get("LORAPORT_NO_HASH_CACHE", "") not in ("", "0"):
        return None
    return cache_root()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashCache:
    """sha256 of input files for one run: memoized within the run (an adapter hashed for the output's provenance
    is not hashed again for the manifest) and, unless `folder` is None, remembered across runs (see above).
    Thread-safe; hashing happens outside the lock. A cache file that is unreadable, malformed or not
    authenticated by the user's key is ignored; without a usable key nothing is remembered across runs."""

    def __init__(self, folder: Path | None = None):
        from loraport import cache_key

        self._secret = cache_key.load() if folder is not None else None
        self.folder = folder if self._secret is not None else None
        self._lock = threading.Lock()
        self._run: dict[str, tuple[list[int], str]] = {}
        self._disk: dict[str, list] | None = None
        self._new: dict[str, list] = {}
        self._busy: dict[str, threading.Event] = {}  # real path -> set when its hashing ends

    @classmethod
    def default(cls, persistent: bool = True) -> HashCache:
        return cls(cache_dir() if persistent else None)

    @classmethod
    def of(cls, spec: HashCache | bool) -> HashCache:
        """merge()'s `hash_cache` argument as a cache: an instance as given (a batch shares one), True the
        persistent cache, False one that remembers nothing beyond this run."""
        return spec if isinstance(spec, HashCache) else cls.default(persistent=bool(spec))

    def _load(self) -> dict[str, list]:
        if self._disk is None:
            self._disk = _read_cache(self.folder / CACHE_FILE, self._secret) if self.folder is not None else {}
        return self._disk

    def _known(self, real: str, ident: list[int]) -> str | None:
        """The remembered digest of an unchanged file (the lock held)."""
        hit = self._run.get(real)
        if hit is not None and hit[0] == ident:
            return hit[1]
        ent = self._load().get(real)
        if ent is not None and ent[:5] == ident:
            self._run[real] = (ident, ent[5])
            self._new[real] = [*ident, ent[5], time.time()]  # refreshes its last use
            return ent[5]
        return None

    def sha256(self, path: str | Path) -> str:
        real = os.path.realpath(path)
        while True:
            st = os.stat(real)
            ident = _identity(st)
            with self._lock:
                known = self._known(real, ident)
                if known is not None:
                    return known
                busy = self._busy.get(real)
                if busy is None:  # nobody is hashing it: this thread does
                    busy = self._busy[real] = threading.Event()
                    break
            busy.wait()  # another thread is hashing this file: wait for its digest, then look again
        started, digest = time.time(), None
        try:
            digest = sha256_file(real)
        finally:
            self._publish(real, ident, digest, started)
        return digest

    def _publish(self, real: str, ident: list[int], digest: str | None, started: float) -> None:
        """Remember the digest of a file hashed since `started` (None: none was made) and wake its waiters."""
        try:
            after = _identity(os.stat(real)) if digest is not None else None
            with self._lock:
                if after == ident:  # unchanged while it was read
                    self._run[real] = (ident, digest)
                    if ident[4] < (started - RACY_SECONDS) * 1e9:  # its ctime: see RACY_SECONDS
                        self._new[real] = [*ident, digest, started]
        finally:
            with self._lock:
                self._busy.pop(real).set()

    def known(self, path: str | Path) -> str | None:
        """The digest of `path` if this run or the cache knows it for the file as it is now, else None."""
        real = os.path.realpath(path)
        ident = _identity(os.stat(real))
        with self._lock:
            return self._known(real, ident)

    def claim(self, path: str | Path, fd: int):
        """A loraport.hash_tap.HashTap through which the merge's reader hashes `path` from the bytes it reads
        from `fd` (that file, open); None when its digest is known already, another thread is hashing it, or
        `fd` is not that file. Until the tap finishes, `sha256(path)` waits for its digest."""
        from loraport.hash_tap import HashTap

        real = os.path.realpath(path)
        st = os.stat(real)
        ident = _identity(st)
        if _identity(os.fstat(fd))[:2] != ident[:2]:  # (device, inode): the path now names another file
            return None
        with self._lock:
            if real in self._busy or self._known(real, ident) is not None:
                return None
            self._busy[real] = threading.Event()
        started = time.time()
        return HashTap(fd, st.st_size, lambda digest: self._publish(real, ident, digest, started))

    def save(self) -> None:
        """Merge this run's entries into the cache file (re-read first: other runs may have written it) and
        replace it atomically. Failures (a read-only home, a full disk) only mean no cache next time."""
        if self.folder is None or not self._new:
            return
        from loraport import cache_key
        path = self.folder / CACHE_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            entries = _read_cache(path, self._secret)
            entries.update(self._new)
            if len(entries) > CACHE_MAX:
                entries = dict(sorted(entries.items(), key=lambda kv: kv[1][6], reverse=True)[:CACHE_MAX])
            tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "entries": entries,
                                       "mac": cache_key.mac(self._secret, CACHE_SCHEMA, entries)}), encoding="utf-8")
            os.replace(tmp, path)
            self._new = {}
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass


def _read_cache(path: Path, secret: bytes | None) -> dict[str, list]:
    """The entries of the cache file, {} unless its HMAC verifies with `secret` (None: nothing verifies)."""
    from loraport import cache_key

    if secret is None:
        return {}
    try:
        if path.stat().st_size > 64 << 20:
            return {}
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    if not isinstance(d, dict) or d.get("schema") != CACHE_SCHEMA or not isinstance(d.get("entries"), dict):
        return {}
    if not cache_key.verify(secret, CACHE_SCHEMA, d["entries"], d.get("mac")):
        return {}
    ok = {}
    for k, v in d["entries"].items():
        if (isinstance(k, str) and isinstance(v, list) and len(v) == 7
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v[:5])
                and isinstance(v[5], str) and len(v[5]) == 64 and all(c in "0123456789abcdef" for c in v[5])
                and isinstance(v[6], (int, float))):
            ok[k] = v
    return ok


def manifest_path(out: str | Path) -> Path:
    """Where the manifest of the output `out` lives (whether or not `out` exists yet)."""
    out = Path(out)
    if out.is_dir():
        return out / FOLDER_MANIFEST
    return out.with_name(out.name + ".manifest.json")


def _files_of(root: Path) -> dict[str, Path]:
    if root.is_file():
        return {root.name: root}
    return {f.relative_to(root).as_posix(): f for f in sorted(root.rglob("*"))
            if f.is_file() and f.name != FOLDER_MANIFEST}


def _input_files(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p is None:
            continue
        p = policy.named(p)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            # the input-path policy's walk: special files skipped, symlinks out of it refused
            files += [f for _, f in policy.walk(p) if not f.name.startswith(".")]
    return files


def input_hashes(paths: list[str | Path], cache: HashCache | None = None, reporter=None) -> dict[str, str]:
    """sha256 of every file of every input (a folder contributes its files, keyed by path). `reporter`: the
    loraport.progress reporter to tell (this often runs on its own thread, away from the caller's)."""
    hash_of = cache.sha256 if cache is not None else sha256_file
    files = _input_files(paths)
    sizes = [f.stat().st_size for f in files]
    out: dict[str, str] = {}
    with step("hash inputs", total=sum(sizes), unit="B", items=len(files), item_unit="files",
              reporter=reporter) as advance:
        for f, size in zip(files, sizes):
            out[str(f)] = hash_of(f)
            advance(size, items=1)
    return out


def build(written: Path, *, inputs: dict[str, str], plan: dict, name: str | None = None,
          known: dict[str, tuple[str, int]] | None = None) -> dict:
    """The manifest of a staged output (`written` is the staged file or folder; `name` the final file name
    of a single-file output, since the staged file has a temporary name). `known`: str(path) -> (sha256,
    size) of files hashed while they were written; used when the file still has that size, else re-read."""
    files = _files_of(written)
    if written.is_file() and name:
        files = {name: written}
    known = known or {}

    def entry(f: Path) -> dict:
        size = f.stat().st_size
        k = known.get(str(f))
        return {"sha256": k[0] if k is not None and k[1] == size else sha256_file(f), "size": size}

    return {
        "schema": SCHEMA,
        "loraport_version": __version__,
        "kind": "file" if written.is_file() else "folder",
        "files": {rel: entry(f) for rel, f in files.items()},
        "inputs": inputs,
        "plan": plan,
    }


def write_into(stage: Path, manifest: dict) -> Path:
    """Folder outputs: write the manifest inside the staged folder."""
    p = stage / FOLDER_MANIFEST
    p.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return p


def write_sibling(out: Path, manifest: dict) -> Path:
    """Single-file outputs: `<out>.manifest.json`, written to a temporary sibling and renamed into place."""
    from loraport.outputs import stage_path, sweep_stale

    dst = manifest_path(out)
    sweep_stale(dst)  # temporaries of runs killed while writing this manifest
    tmp = stage_path(dst)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return dst


def load(out: str | Path) -> tuple[Path, dict]:
    out = Path(out)
    if not out.exists():
        raise BadInputError(f"{out}: not found")
    mp = manifest_path(out)
    if not mp.is_file():
        raise BadInputError(f"{out}: no loraport manifest ({mp.name} missing); was it written by loraport merge?")
    try:
        if mp.stat().st_size > MAX_JSON:
            raise ValueError(f"{mp.stat().st_size} bytes, at most {MAX_JSON}")
        m = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise VerifyFailed(f"{mp}: the manifest is unreadable ({str(e)[:100]})") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or not isinstance(m.get("files"), dict):
        raise VerifyFailed(f"{mp}: not a {SCHEMA} manifest")
    for rel, ent in m["files"].items():
        if not isinstance(rel, str) or not isinstance(ent, dict) or not isinstance(ent.get("sha256"), str):
            raise VerifyFailed(f"{mp}: malformed entry for {str(rel)[:80]!r}")
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts or "\x00" in rel:
            raise VerifyFailed(f"{mp}: entry {rel[:80]!r} is not a path inside the output")
    return mp, m


def verify(out: str | Path, check_inputs: bool = False) -> dict:
    """Re-hash every file the manifest lists. Returns a report; `problems` is empty when all match.
    Extra files in a folder output are reported as problems too (something was added after loraport)."""
    out = Path(out)
    mp, m = load(out)
    root = out if out.is_dir() else out.parent
    problems: list[str] = []
    checked = 0
    for rel, ent in each(sorted(m["files"].items()), "verify", count=len(m["files"]), item_unit="files",
                         size=lambda kv: kv[1]["size"] if isinstance(kv[1].get("size"), int) else 0,
                         total=sum(e["size"] for e in m["files"].values() if isinstance(e.get("size"), int))):
        f = out if m.get("kind") == "file" and rel == out.name else root / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = f.stat().st_size
        if isinstance(ent.get("size"), int) and size != ent["size"]:
            problems.append(f"{rel}: size {size}, manifest says {ent['size']}")
            continue
        if sha256_file(f) != ent["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
        checked += 1
    if out.is_dir():
        extra = sorted(set(_files_of(out)) - set(m["files"]))
        problems += [f"{rel}: not in the manifest" for rel in extra]
    inputs_changed: list[str] = []
    if check_inputs:
        for p, h in sorted((m.get("inputs") or {}).items()):
            if not Path(p).is_file():
                inputs_changed.append(f"{p}: input missing")
            elif sha256_file(p) != h:
                inputs_changed.append(f"{p}: input changed since the merge")
    return {"out": str(out), "manifest": str(mp), "files_checked": checked, "files": len(m["files"]),
            "problems": problems, "inputs_changed": inputs_changed, "plan": m.get("plan", {}),
            "ok": not problems}


class BackgroundHashes:
    """sha256 of the inputs computed on a daemon thread while the merge streams (overlapping the reads)."""

    def __init__(self, paths: list[str | Path], cache: HashCache | None = None):
        self._paths = paths
        self._cache = cache
        self._reporter = progress_reporter()  # taken here: the thread below does not inherit the caller's context
        self._result: dict[str, str] | None = None
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            self._result = input_hashes(self._paths, self._cache, reporter=self._reporter)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._error = e

    def result(self) -> dict[str, str]:
        self._t.join()
        if self._error is not None:
            raise self._error
        if self._cache is not None:
            self._cache.save()
        return self._result or {}


def validate_hints(out: str | Path) -> dict:
    """What `loraport validate` needs to rebuild the reference of a merged output from its manifest:
    {"base": path, "adapters": [{"source": path, "weight": w}]} ({} without a readable manifest)."""
    try:
        _, m = load(out)
    except LoraportError:
        return {}
    plan = m.get("plan") if isinstance(m.get("plan"), dict) else {}
    ads = [a for a in plan.get("adapters", []) if isinstance(a, dict) and isinstance(a.get("path"), str)]
    base = plan.get("reference") or plan.get("base")  # a bake's reference is the HF folder the .onnx came from
    if not isinstance(base, str) or not ads:
        return {}
    hints = [{"source": a["path"], "weight": float(a.get("weight", 1.0))} for a in ads]
    if base.endswith(".onnx"):  # baked into a loraport export: its own base and merged adapters come first
        exp = Path(base).parent / "loraport_onnx.json"  # loraport.onnx.export.MANIFEST (onnx not imported here)
        try:
            e = json.loads(exp.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return {}
        if not isinstance(e, dict) or e.get("kind") != "merged" or e.get("model") != Path(base).name \
                or not isinstance(e.get("base"), str):
            return {}
        base = e["base"]
        hints = [{"source": a["source"], "weight": float(a.get("weight", 1.0))} for a in e.get("adapters", [])
                 if isinstance(a, dict) and isinstance(a.get("source"), str)] + hints
    return {"base": base, "adapters": hints}
