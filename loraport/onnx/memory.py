"""Keeping the export's resident set small: packages the capture can do without, and freed memory given back.

`lean_imports()`: transformers imports some optional packages eagerly, whenever they are installed, that
capturing a decoder's graph never calls: scipy (`transformers.loss` imports `scipy.optimize` for the
object-detection losses) and accelerate (device maps and big-model loading; it pulls in boto3 through its
SageMaker config). Together they are ~50 MB resident of the ~0.5 GB an export process peaks at. While the
capture imports transformers they are marked absent (`sys.modules[name] = None`: `import` raises ImportError,
`importlib.util.find_spec` answers None, so transformers takes its not-installed branch). transformers
remembers that for the life of the process, so this is done only in loraport's own command-line process
(which ends after the export), and only when transformers has not been imported yet; never for a library
caller. The marks are removed after the capture.

`trim()`: asks the C heap to return freed pages to the system (glibc `malloc_trim`). The weight streaming
frees tensor-sized buffers from a worker thread, and glibc keeps a thread heap's freed space resident until
told otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import sys
from pathlib import Path

# optional packages transformers imports eagerly that a weights-free capture never uses
UNUSED_BY_CAPTURE = ("scipy", "accelerate")

_libc = None


def own_process() -> bool:
    """True when this process is loraport's command line (`python -m loraport` or the `loraport` script)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "loraport.__main__":
        return True
    return Path(sys.argv[0] if sys.argv else "").name == "loraport"


@contextlib.contextmanager
def lean_imports(enabled: bool = True):
    """Mark UNUSED_BY_CAPTURE absent while transformers is first imported (see the module docstring)."""
    marked = []
    if enabled and "transformers" not in sys.modules:
        for name in UNUSED_BY_CAPTURE:
            if importlib.util.find_spec(name) is None:  # not installed: nothing to leave out (nor to report)
                continue
            if not any(m == name or m.startswith(name + ".") for m in sys.modules):
                sys.modules[name] = None
                marked.append(name)
    try:
        yield marked
    finally:
        for name in marked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def trim() -> None:
    """Return the C heap's free pages (every arena's) to the system."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
