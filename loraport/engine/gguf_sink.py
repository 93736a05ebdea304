"""The GGUF sink: writes a GGUF v3 file tensor by tensor, in the layout's order, with the header (metadata and
tensor table) known up front — the mirror of `loraport.formats.gguf.GGUFFile`'s walk:

    magic "GGUF" · u32 version · u64 n_tensors · u64 n_kv
    n_kv × (string key · u32 value type · value)         strings: u64 length + UTF-8; arrays: u32 item type,
    n_tensors × (string name · u32 n_dims · u64 ne[n_dims] · u32 ggml type · u64 offset)   u64 count, items
    padding to general.alignment (32) · each tensor's bytes, padded to the alignment

Metadata is written back with each key's original value type, in the original order. The tensors' bytes come
from the stream: a base tensor's stored bytes when nothing updates it, its re-quantized bytes otherwise.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraport.formats.gguf import _SCALARS, MAGIC, T_ARRAY, T_STRING


@dataclass(frozen=True)
class GgufEntry:
    name: str
    shape: tuple[int, ...]  # torch order (ggml ne reversed)
    ggml_type: int
    nbytes: int


def _pad(n: int, align: int) -> int:
    return n + (-n) % align


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, etype: int | None, v) -> bytes:
    if vtype in _SCALARS:
        return struct.pack(_SCALARS[vtype][0], v)
    if vtype == T_STRING:
        return _string(v)
    if vtype == T_ARRAY and etype is not None:
        head = struct.pack("<IQ", etype, len(v))
        if etype == T_STRING:
            return head + b"".join(_string(s) for s in v)
        return head + np.asarray(v, dtype=np.dtype(_SCALARS[etype][0])).tobytes()
    raise ValueError(f"GGUF value type {vtype} cannot be written")


def header(metadata: list[tuple[str, int, int | None, object]], entries: list[GgufEntry], align: int) -> bytes:
    """Everything before the first tensor's bytes (padding included)."""
    out = [MAGIC, struct.pack("<IQQ", 3, len(entries), len(metadata))]
    for key, vtype, etype, v in metadata:
        out += [_string(key), struct.pack("<I", vtype), _value(vtype, etype, v)]
    off = 0
    for e in entries:
        out += [_string(e.name), struct.pack("<I", len(e.shape)),
                struct.pack(f"<{len(e.shape)}Q", *reversed(e.shape)), struct.pack("<IQ", e.ggml_type, off)]
        off += _pad(e.nbytes, align)
    b = b"".join(out)
    return b + b"\0" * ((-len(b)) % align)


class GgufSink:
    """Writes `entries` in order to `path`; `write(name, data)` takes each tensor's bytes (flat uint8)."""

    def __init__(self, path: Path, metadata: list[tuple[str, int, int | None, object]], entries: list[GgufEntry],
                 align: int = 32):
        self.entries, self.align, self.next = entries, align, 0
        self.f = open(path, "wb")
        self.f.write(header(metadata, entries, align))
        self.bytes = 0

    def write(self, name: str, data: torch.Tensor) -> int:
        e = self.entries[self.next]
        if name != e.name or data.numel() != e.nbytes:
            raise RuntimeError(f"GGUF sink: got {name} ({data.numel()} bytes), planned {e.name} ({e.nbytes} bytes)")
        self.f.write(memoryview(data.contiguous().numpy()))
        self.f.write(b"\0" * ((-e.nbytes) % self.align))
        self.next += 1
        self.bytes += e.nbytes
        return e.nbytes

    def close(self) -> None:
        if self.next != len(self.entries):
            raise RuntimeError(f"GGUF sink closed after {self.next} of {len(self.entries)} tensors")
        self.f.close()

    def abort(self) -> None:
        self.f.close()
