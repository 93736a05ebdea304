"""Write ONNX initializers one at a time into an external-data file.

Each `add()` appends the tensor's bytes (aligned) to `<model>.onnx.data` and returns the `TensorProto` that
points at them, so a model of any size is written holding one tensor at a time. Tiny tensors (and
zero-size ones) are stored inline in the proto. A dtype change is done in pieces of `PIECE` source bytes,
and `add_stored()` copies an untouched base tensor file-to-file (copy_file_range) or converts it piece by
piece from the base file, so neither needs the whole tensor in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto


from loraport.safetensors_io import read_into

INLINE_MAX = 1024  # bytes; smaller tensors stay in the .onnx file
ALIGN = 64
PIECE = 1 << 20  # bytes of source data converted at a time (two buffers of this order live during an export)
COPY_CHUNK = 64 << 20  # bytes per copy_file_range call (copied in the kernel: no buffer of ours)

TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.int8: TensorProto.INT8,
    torch.uint8: TensorProto.UINT8,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
    torch.bool: TensorProto.BOOL,
    torch.float64: TensorProto.DOUBLE,
}
ONNX_TO_TORCH = {v: k for k, v in TORCH_TO_ONNX.items()}


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes lie in an input file: copied or converted piecewise by ExternalDataWriter.add_stored."""

    fd: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: str


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array (zero-copy when already contiguous on CPU)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


class ExternalDataWriter:
    def __init__(self, folder: Path, location: str):
        self.location = location
        self.path = Path(folder) / location
        self._f = open(self.path, "wb", buffering=0)  # unbuffered: big writes go straight to the file
        self.offset = 0
        self.bytes_written = 0
        self._buf: bytearray | None = None  # reusable read buffer (conversions from a base file)
        self._out: torch.Tensor | None = None  # reusable converted-piece buffer

    # ------------------------------------------------------------------------------------------ public
    def add(self, name: str, data: torch.Tensor, onnx_dtype: int | None = None,
            dims: tuple[int, ...] | None = None) -> TensorProto:
        """Append `data`, converted to `onnx_dtype` (piecewise) when its dtype differs."""
        onnx_dtype = onnx_dtype if onnx_dtype is not None else TORCH_TO_ONNX[data.dtype]
        want = ONNX_TO_TORCH[onnx_dtype]
        dims = tuple(dims if dims is not None else data.shape)
        data = data.detach().to("cpu")
        if data.dtype == want:
            raw = tensor_bytes(data)
            if raw.nbytes <= INLINE_MAX:
                return self._inline(name, onnx_dtype, dims, raw.tobytes())
            begin = self._begin()
            self._write(memoryview(raw))
            return self._external(name, onnx_dtype, dims, begin)
        flat = data.contiguous().reshape(-1)
        size = want.itemsize
        if flat.numel() * size <= INLINE_MAX:
            return self._inline(name, onnx_dtype, dims, tensor_bytes(flat.to(want)).tobytes())
        begin = self._begin()
        step = max(1, PIECE // max(flat.element_size(), size))
        for i in range(0, flat.numel(), step):
            self._write(self._convert(flat[i:i + step], want))
        return self._external(name, onnx_dtype, dims, begin)

    def add_stored(self, name: str, src, onnx_dtype: int, dims: tuple[int, ...]) -> TensorProto:
        """Append a tensor straight from its input file (`src`: a Stored), converted to `onnx_dtype`."""
        from loraport.errors import BadInputError

        want = ONNX_TO_TORCH[onnx_dtype]
        out_size, in_size = want.itemsize, src.dtype.itemsize
        n = src.nbytes // in_size
        if n * out_size <= INLINE_MAX:
            buf = bytearray(src.nbytes)
            if read_into(src.fd, memoryview(buf), src.offset) != src.nbytes:
                raise BadInputError(f"{src.path}: truncated while reading {name}")
            t = torch.frombuffer(buf, dtype=src.dtype) if buf else torch.empty(0, dtype=src.dtype)
            return self._inline(name, onnx_dtype, dims, tensor_bytes(t.to(want)).tobytes())
        begin = self._begin()
        if want == src.dtype:
            self._copy_range(src, name)
        else:
            piece = max(in_size, PIECE // in_size * in_size)
            view = self._read_buffer(piece)
            pos = 0
            while pos < src.nbytes:
                k = min(piece, src.nbytes - pos)
                if read_into(src.fd, view[:k], src.offset + pos) != k:
                    raise BadInputError(f"{src.path}: truncated while reading {name}")
                self._write(self._convert(torch.frombuffer(view[:k], dtype=src.dtype), want))
                pos += k
        return self._external(name, onnx_dtype, dims, begin)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._buf = self._out = None

    # ------------------------------------------------------------------------------------------ buffers
    # Two buffers live for the whole export and are reused for every piece: allocating a fresh piece-sized
    # block each time lets the C heap fragment and keep tens of MB resident after they are freed.
    def _read_buffer(self, n: int) -> memoryview:
        if self._buf is None or len(self._buf) < n:
            self._buf = bytearray(n)
        return memoryview(self._buf)

    def _convert(self, piece: torch.Tensor, want: torch.dtype) -> memoryview:
        """`piece` (1-D, CPU) converted to `want` in the reusable output buffer; its bytes."""
        n = piece.numel()
        if self._out is None or self._out.dtype != want or self._out.numel() < n:
            self._out = None
            self._out = torch.empty(max(n, PIECE // want.itemsize), dtype=want)
        out = self._out[:n]
        out.copy_(piece)
        return memoryview(out.view(torch.uint8).numpy())

    # ------------------------------------------------------------------------------------------ internals
    def _begin(self) -> int:
        pad = (-self.offset) % ALIGN
        if pad:
            self._write(b"\0" * pad)
            self.bytes_written -= pad
        return self.offset

    def _write(self, data) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += self._f.write(mv[done:])
        self.offset += len(mv)
        self.bytes_written += len(mv)

    def _copy_range(self, src, name: str) -> None:
        """File-to-file copy in the kernel (no user-space buffer); plain reads where unsupported."""
        from loraport.errors import BadInputError

        pos = 0
        dst = self._f.fileno()
        copy = getattr(os, "copy_file_range", None)
        while pos < src.nbytes and copy is not None:
            try:
                n = copy(src.fd, dst, min(COPY_CHUNK, src.nbytes - pos), src.offset + pos, self.offset)
            except OSError:
                break
            if n <= 0:
                break
            pos += n
            self.offset += n
            self.bytes_written += n
        if pos < src.nbytes:
            view = self._read_buffer(PIECE)
            os.lseek(dst, self.offset, os.SEEK_SET)
            while pos < src.nbytes:
                k = min(PIECE, src.nbytes - pos)
                if read_into(src.fd, view[:k], src.offset + pos) != k:
                    raise BadInputError(f"{src.path}: truncated while reading {name}")
                self._write(view[:k])
                pos += k
        os.lseek(dst, self.offset, os.SEEK_SET)

    @staticmethod
    def _inline(name: str, onnx_dtype: int, dims: tuple[int, ...], raw: bytes) -> TensorProto:
        tp = TensorProto(name=name, data_type=onnx_dtype)
        tp.dims.extend(list(dims))
        tp.raw_data = raw
        return tp

    def _external(self, name: str, onnx_dtype: int, dims: tuple[int, ...], begin: int) -> TensorProto:
        tp = TensorProto(name=name, data_type=onnx_dtype)
        tp.dims.extend(list(dims))
        tp.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(begin)), ("length", str(self.offset - begin))):
            e = tp.external_data.add()
            e.key, e.value = k, v
        return tp
