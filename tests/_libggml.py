"""libggml's own quantizer, reached through llama-cpp-python's bundled shared library with ctypes — the
reference for loraport's k-quants (tests, bench/gguf_bench.py, fixtures/makers/ggml.py). loraport itself never
loads it. `load()` returns None where llama-cpp-python is not installed or its library lacks the symbols."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

IDS = {"Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}  # enum ggml_type


class LibGgml:
    def __init__(self, lib: ctypes.CDLL, version: str):
        self.lib, self.version = lib, version
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]

    def quantize(self, x: np.ndarray, name: str) -> np.ndarray:
        """ggml_quantize_chunk(type, x, imatrix=NULL) over all rows of a 2-D fp32 array, on this thread:
        flat uint8 bytes."""
        t = IDS[name]
        assert not self.lib.ggml_quantize_requires_imatrix(t)
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.empty(rows * self.lib.ggml_row_size(t, cols), np.uint8)
        n = self.lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        assert n == out.size
        return out


def load() -> LibGgml | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).is_file():
            try:
                lib = ctypes.CDLL(str(libdir / name))
                lib.ggml_quantize_chunk  # noqa: B018 - the symbol must exist
            except (OSError, AttributeError):
                return None
            from importlib.metadata import version

            return LibGgml(lib, version("llama_cpp_python"))
    return None
