"""The ONNX external-data sink: the merge engine's stream (`loraport.engine.stream.Stream`) writes an export's or a
bake's initializers through it, as it writes safetensors shards through `engine.sinks.SafetensorsSink`.

Every tensor is appended to one external-data file by `ExternalDataWriter` (aligned; tensors of at most
INLINE_MAX bytes stay inline in the proto) and its TensorProto kept, by source name, for the caller to put into
the graph in the graph's order. A tensor the stream passes through untouched is copied from its input file in
the kernel (`add_stored`), never held whole. A source that serves a matrix transposed relative to how the graph
stores it (a foreign model's `x @ W` initializers, see onnx/initializers.py) names it in `transposed`: the sink
writes it back in the stored layout.
"""

from __future__ import annotations

import math

import torch
from onnx import TensorProto

from loraport.engine.layout import OutEntry, OutFile, nbytes
from loraport.onnx.external import TORCH_TO_ONNX, ExternalDataWriter, Stored


class OnnxDataSink:
    converts = True  # `copy` converts a tensor that only changes dtype piecewise from its file (add_stored)

    def __init__(self, writer: ExternalDataWriter, layout: list[OutFile], transposed: frozenset[str] = frozenset()):
        self.writer, self.transposed = writer, transposed
        self.entries: dict[str, list[OutEntry]] = {}
        for f in layout:
            for e in f.entries:
                self.entries.setdefault(e.name, []).append(e)
        self.protos: dict[str, list[TensorProto]] = {}  # source name -> the initializers written for it

    def copy(self, fi: int, name: str, source) -> tuple[int, None]:
        """`name` unmerged: its stored bytes copied file-to-file where the source has a plain file span, or
        converted to the entry's dtype in pieces of PIECE bytes (onnx/external.py)."""
        e = self.entries[name][0]
        span = source.span(name)
        if span is not None:
            stored = Stored(*span, source.info(name).dtype, e.shape, source.where(name))
            tp = self.writer.add_stored(e.key, stored, TORCH_TO_ONNX[e.dtype], e.shape)
        else:
            tp = self.writer.add(e.key, source.get(name), TORCH_TO_ONNX[e.dtype], e.shape)
        self.protos[name] = [tp]
        return nbytes(e), None

    def write(self, fi: int, name: str, outs: list[torch.Tensor]) -> tuple[int, None]:
        """The tensors computed for `name`, in layout order (checked against the planned dtypes and sizes)."""
        ents = self.entries[name]
        if len(outs) != len(ents):
            raise RuntimeError(f"{name}: {len(outs)} tensors for {len(ents)} entries")
        protos, n = [], 0
        for e, t in zip(ents, outs):
            if name in self.transposed:
                t = t.t()
            if t.dtype != e.dtype or t.numel() != math.prod(e.shape):
                raise RuntimeError(f"{name}: produced {t.dtype} {list(t.shape)}, planned {e.dtype} {list(e.shape)}")
            protos.append(self.writer.add(e.key, t, TORCH_TO_ONNX[e.dtype], e.shape))
            n += nbytes(e)
        self.protos[name] = protos
        return n, None

    def wait(self, token) -> None:  # every write is done when `write` returns
        pass

    def close_if_complete(self, fi: int) -> None:
        pass

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.close()

    def hashes(self) -> dict[str, tuple[str, int]]:
        return {}


def data_layout(relpath: str, entries: list[OutEntry]) -> list[OutFile]:
    """One external-data file holding `entries`, in their order."""
    return [OutFile(relpath, entries, list(dict.fromkeys(e.name for e in entries)), {})]
