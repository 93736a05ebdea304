"""The ONNX source: a foreign ONNX model's initializers by name (`OnnxGraph`), served to the merge engine's stream
for baking (`InitializerSource`), as a checkpoint's tensors are served for a merge.

Every field of an initializer is checked before it is read (dims, inline sizes, external-data location inside
the model's folder, offsets and lengths inside the file). A weight the graph stores transposed relative to its
module's torch layout (`x @ W`: see onnx/baking.py) is served as the transpose view, so deltas apply in torch
orientation; the ONNX sink writes it back in the stored layout. An untouched external initializer is copied
file-to-file (its span), never held whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from loraport import paths
from loraport.errors import BadInputError
from loraport.onnx.external import ONNX_TO_TORCH


def consumers(g: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    c: dict[str, list] = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            c.setdefault(x, []).append((n, i))
    return c


class OnnxGraph:
    """A foreign ONNX model, its initializers by name, read one at a time with every field checked."""

    def __init__(self, path: Path):
        self.path = path
        self.proto = onnx.load(str(path), load_external_data=False)
        g = self.proto.graph
        self.inits = {t.name: t for t in g.initializer}
        self.cons = consumers(g)
        self.names = list(self.inits)
        # every external-data file passes the input-path policy before an output is staged (read() checks again)
        locs = {e.value for t in g.initializer if t.data_location == TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}
        for loc in sorted(locs):
            paths.external(path, loc)

    def dims(self, name: str) -> list[int]:
        return list(self.inits[name].dims)

    def read(self, name: str) -> torch.Tensor:
        """One initializer as a CPU tensor (external data memory-mapped, copied); every field checked first."""
        t = self.inits[name]
        where = f"{self.path}: initializer {name[:80]!r}"
        dt = ONNX_TO_TORCH.get(t.data_type)
        dims = [int(d) for d in t.dims]
        n = numel(dims, where)
        if t.data_location == TensorProto.EXTERNAL:
            if dt is None:
                raise BadInputError(f"{where} has ONNX type {t.data_type} loraport cannot read")
            return self._read_external(t, where, dims, dt, n * dt.itemsize)
        nbytes = n * dt.itemsize if dt is not None else None  # (packed 4-bit types: left to onnx's check)
        if nbytes is not None and t.raw_data and len(t.raw_data) != nbytes:
            raise BadInputError(f"{where}: inline data of {len(t.raw_data)} bytes, but {dims} needs {nbytes}")
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001 - onnx raises ValueError/TypeError/KeyError on malformed fields
            raise BadInputError(f"{where}: malformed tensor data ({type(e).__name__}: {str(e)[:100]})") from None
        if t.data_type == TensorProto.BFLOAT16:
            return torch.from_numpy(arr.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(arr))

    def _read_external(self, t, where: str, dims: list[int], dt: torch.dtype, nbytes: int) -> torch.Tensor:
        f, off, length = self.external_span(t, where, nbytes)
        if not length:
            return torch.empty(dims, dtype=dt)
        mm = np.memmap(f, dtype=np.uint8, mode="r", offset=off, shape=(length,))
        return torch.from_numpy(np.array(mm)).view(dt).reshape(dims)

    def external_span(self, t, where: str, nbytes: int) -> tuple[Path, int, int]:
        """(file, offset, length) of an external initializer's bytes, after the input-path policy and the
        checks that they lie inside the file and match its dims."""
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        try:
            f = paths.external(self.path, loc)  # inside the model's folder, after symlinks; a regular file
        except BadInputError as e:
            raise type(e)(f"{e} [external data of {where}]") from None
        off = _field_int(info, "offset", 0, where)
        length = _field_int(info, "length", nbytes, where)
        if length != nbytes or not f.is_file() or off + length > f.stat().st_size:
            raise BadInputError(f"{where}: external data is missing or truncated in {loc[:80]}")
        return f, off, length


MAX_NUMEL = 1 << 40  # elements of one initializer (4 TiB of fp32): past that a dims field is corrupt


def numel(dims: list[int], where: str) -> int:
    """Element count of ONNX `dims`, in Python integers (no overflow), refused when negative or absurd."""
    n = 1
    for d in dims:
        if d < 0:
            raise BadInputError(f"{where}: negative dimension in {dims[:8]}")
        n *= d
    if n > MAX_NUMEL:
        raise BadInputError(f"{where}: dims {dims[:8]} hold {n} elements (at most {MAX_NUMEL}); corrupt")
    return n


def _field_int(info: dict, key: str, default: int, where: str) -> int:
    v = info.get(key)
    if v is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", v):
        raise BadInputError(f"{where}: external data {key} {v[:30]!r} is not a non-negative integer")
    return int(v)


class _Info:
    __slots__ = ("dtype", "shape", "nbytes")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int):
        self.dtype, self.shape, self.nbytes = dtype, shape, nbytes


class InitializerSource:
    """The stream's source for a bake (the interface of loraport.checkpoint.Checkpoint the stream uses, plus
    `where`): `names`, the initializers the bake writes, in graph order; `transposed`, those served transposed."""

    def __init__(self, g: OnnxGraph, names: list[str], transposed: frozenset[str]):
        self.g, self._names, self.transposed = g, names, transposed
        self._fds: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self._names)

    def _where(self, name: str) -> str:
        return f"{self.g.path}: initializer {name[:80]!r}"

    def info(self, name: str) -> _Info:
        t = self.g.inits[name]
        dt = ONNX_TO_TORCH.get(t.data_type)
        if dt is None:
            raise BadInputError(f"{self._where(name)} has ONNX type {t.data_type} loraport cannot read")
        dims = tuple(int(d) for d in t.dims)
        n = numel(list(dims), self._where(name))
        return _Info(dt, tuple(reversed(dims)) if name in self.transposed else dims, n * dt.itemsize)

    def get(self, name: str) -> torch.Tensor:
        W = self.g.read(name)
        return W.t() if name in self.transposed else W

    def span(self, name: str) -> tuple[int, int, int] | None:
        t = self.g.inits[name]
        if t.data_location != TensorProto.EXTERNAL or name in self.transposed:
            return None
        f, off, length = self.g.external_span(t, self._where(name), self.info(name).nbytes)
        if f not in self._fds:
            self._fds[f] = os.open(f, os.O_RDONLY)
        return self._fds[f], off, length

    def where(self, name: str) -> str:
        return str(self.g.path)

    def release(self, name: str) -> None:
        pass

    def layer_hint(self, name: str) -> str | None:
        return None  # deltas are resolved against the module's layout when the bake is planned

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
