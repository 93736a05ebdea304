"""Write ONNX initializers one at a time into an external-data file.

Each `add()` appends the tensor's bytes (aligned) to `<model>.onnx.data` and returns the `TensorProto` that
points at them, so a model of any size is written holding one tensor at a time. Tiny tensors (and
zero-size ones) are stored inline in the proto.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto

INLINE_MAX = 1024  # bytes; smaller tensors stay in the .onnx file
ALIGN = 64

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


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array (zero-copy when already contiguous on CPU)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


class ExternalDataWriter:
    def __init__(self, folder: Path, location: str):
        self.location = location
        self.path = Path(folder) / location
        self._f = open(self.path, "wb")
        self.offset = 0
        self.bytes_written = 0

    def add(self, name: str, data: torch.Tensor, onnx_dtype: int | None = None,
            dims: tuple[int, ...] | None = None) -> TensorProto:
        raw = tensor_bytes(data)
        tp = TensorProto(name=name, data_type=onnx_dtype if onnx_dtype is not None else TORCH_TO_ONNX[data.dtype])
        tp.dims.extend(list(dims if dims is not None else data.shape))
        if raw.nbytes <= INLINE_MAX:
            tp.raw_data = raw.tobytes()
            return tp
        pad = (-self.offset) % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        self._f.write(memoryview(raw))
        tp.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(raw.nbytes))):
            e = tp.external_data.add()
            e.key, e.value = k, v
        self.offset += raw.nbytes
        self.bytes_written += raw.nbytes
        return tp

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()
