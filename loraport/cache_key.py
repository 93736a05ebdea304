"""The cache folder (`cache_root()`) and the per-user secret that authenticates loraport's cache entries.

The cache folder is not trusted: it may be shared, restored by a CI job from elsewhere, or writable by someone
else. So every entry loraport writes there (a captured ONNX graph's meta.json, the remembered input sha256 file)
carries an HMAC-SHA256 made with a key only this user can read, and an entry is used, pruned or cleared only
when its HMAC verifies. An entry swapped, forged or restored from another
machine fails the check: it is a miss (rebuilt), never used, never an error.

Key file: $LORAPORT_KEY_FILE, else $XDG_CONFIG_HOME/loraport/cache.key, else ~/.config/loraport/cache.key:
64 hex digits, created on first use with mode 0600 (written beside and linked into place, so two processes
agree on one key). A key file that is not a regular file owned by this user, is readable or writable by group
or others, is malformed, or sits inside the cache folder is refused: the cache is off (one warning), the
outputs are unchanged. A CI job that wants its restored cache to hit keeps its key file as a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import warnings
from pathlib import Path

KEY_ENV = "LORAPORT_KEY_FILE"
_warned: set[tuple[str, str]] = set()


class CacheKeyWarning(UserWarning):
    """The cache key file is unusable: the cache is off for this run."""


class _Refused(Exception):
    pass


def cache_root() -> Path:
    """loraport's cache folder: $LORAPORT_CACHE_DIR, else $XDG_CACHE_HOME/loraport, else ~/.cache/loraport."""
    if os.environ.get("LORAPORT_CACHE_DIR"):
        return Path(os.environ["LORAPORT_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "loraport" if xdg else Path.home() / ".cache" / "loraport"


def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "loraport" / "cache.key"


def load() -> bytes | None:
    """The key (created on first use), or None after one warning when it cannot be trusted or made."""
    path = key_path()
    try:
        try:
            return _read(path)
        except FileNotFoundError:
            _create(path)
            return _read(path)
    except _Refused as e:
        _warn(path, str(e))
    except OSError as e:
        _warn(path, f"cannot read or create it ({e.strerror or e})")
    return None


def status() -> dict:
    """For `loraport cache info`: where the key is and whether it is usable (without creating it)."""
    path = key_path()
    try:
        _read(path)
        return {"key_file": str(path), "key_ok": True, "key_problem": ""}
    except FileNotFoundError:
        return {"key_file": str(path), "key_ok": False, "key_problem": "not created yet (made on first use)"}
    except (_Refused, OSError) as e:
        return {"key_file": str(path), "key_ok": False, "key_problem": f"refused, the cache is off: {e}"}


def _read(path: Path) -> bytes:
    try:
        if path.resolve().is_relative_to(cache_root().resolve()):
            raise _Refused("it lies inside the cache folder, which is not trusted; keep it elsewhere")
    except (OSError, RuntimeError):
        pass
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        if path.is_symlink():
            raise _Refused("it is a symbolic link; make it a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("not a regular file")
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise _Refused(f"owned by uid {st.st_uid}, not by you")
        if hasattr(os, "geteuid") and st.st_mode & 0o077:
            raise _Refused(f"mode {stat.S_IMODE(st.st_mode):o} lets others read or write it; chmod 600 it")
        text = os.read(fd, 256).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise _Refused("not a loraport key (64 hex digits); delete it and a new one is made")
    return bytes.fromhex(text)


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process made meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def _warn(path: Path, why: str) -> None:
    if (str(path), why) in _warned:
        return
    _warned.add((str(path), why))
    warnings.warn(f"loraport cache key {path}: {why}; the cache is off for this run", CacheKeyWarning,
                  stacklevel=3)


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def mac(key: bytes, purpose: str, obj) -> str:
    """HMAC-SHA256 of `obj`'s canonical JSON, bound to `purpose` (a schema name: no cross-kind replay)."""
    return hmac.new(key, purpose.encode() + b"\0" + canonical(obj), hashlib.sha256).hexdigest()


def verify(key: bytes, purpose: str, obj, tag) -> bool:
    if not isinstance(tag, str):
        return False
    try:
        want = mac(key, purpose, obj)
    except (TypeError, ValueError, RecursionError):
        return False
    return hmac.compare_digest(want, tag)
