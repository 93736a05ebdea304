"""Stream the merged weights while the graph is being captured.

Capturing the graph (torch.onnx tracing, mostly Python) and producing the weights (file reads, kernel copies,
BLAS for the LoRA products: they release the GIL) use different resources, so on a small model most of the
weight work can hide behind the capture. The weights do not have a place in `model.onnx.data` until the graph
says which initializers it has and in which order, so a worker thread writes every checkpoint tensor, merged,
in the export dtype, to a scratch file inside the staged output; the export then copies each initializer's
bytes from there in graph order (copy_file_range: in the kernel) and deletes the scratch file.

Used only where it cannot change a result: fp32 exports without quantization, on CPU, while torch's default
dtype is fp32 (the capture sets the default dtype to the export dtype while it builds the model: a no-op then),
and for models whose weights are small enough (`MAX_BYTES`) that the extra in-kernel copy costs less than the
capture time it hides. Anything the graph asks for that the scratch file lacks (another dtype, a buffer, a
name the checkpoint spells differently) is streamed the ordinary way afterwards.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from onnx import TensorProto

from loraport.onnx.external import ExternalDataWriter
from loraport.onnx.memory import trim
from loraport.onnx.weights import Stored, WeightSource

MAX_BYTES = 6 << 30  # fp32 bytes of weights up to which the scratch-file copy pays for itself
SCRATCH = ".prestream.data"


def eligible(src: WeightSource, dtype: str, quantize: str | None, fp32_bytes: int) -> bool:
    return (dtype == "fp32" and quantize is None and src.device.type == "cpu"
            and torch.get_default_dtype() == torch.float32 and 0 < fp32_bytes <= MAX_BYTES)


class Prestream:
    """A worker thread writing every checkpoint tensor (merged, fp32) to `folder/SCRATCH`."""

    def __init__(self, src: WeightSource, folder: Path):
        self.src = src
        self.path = Path(folder) / SCRATCH
        self._writer = ExternalDataWriter(self.path.parent, self.path.name)
        self._done: dict[str, TensorProto] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraport-onnx-prestream", daemon=True)
        self._fd: int | None = None

    def start(self) -> Prestream:
        self._thread.start()
        return self

    def _run(self) -> None:
        # Any failure just stops the worker: what it finished stays usable, everything else is produced by the
        # ordinary path afterwards, which reports its own error if the problem is real (and stays silent if
        # the graph never needed the tensor that failed here).
        try:
            for name in self.src.ckpt.names():
                if self._stop.is_set():
                    return
                stored = self.src.stored(name)
                if stored is not None:
                    tp = self._writer.add_stored(name, stored, TensorProto.FLOAT, stored.shape)
                else:
                    W = self.src.merged(name, None)
                    if not W.is_floating_point():
                        return
                    tp = self._writer.add(name, W, TensorProto.FLOAT, tuple(W.shape))
                    del W
                self._done[name] = tp
        except Exception:  # noqa: BLE001 - see above
            return
        finally:
            self._writer.close()
            self.src.release()  # the read/merge buffers: the capture is about to peak (see onnx/memory.py)
            trim()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def finish(self) -> None:
        """Wait for the worker (the weight source is the caller's again afterwards)."""
        self._thread.join()

    def lookup(self, graph_name: str, onnx_dtype: int, shape: tuple[int, ...]) -> Stored | TensorProto | None:
        """Where the scratch file holds `graph_name` (a Stored to copy from, or an inline TensorProto), or None
        when it must be produced afresh."""
        if onnx_dtype != TensorProto.FLOAT:
            return None
        ck = self.src.checkpoint_name(graph_name)
        tp = self._done.get(ck) if ck is not None else None
        if tp is None or torch.Size(tuple(tp.dims)).numel() != torch.Size(shape).numel():
            return None
        if tp.data_location != TensorProto.EXTERNAL:
            out = TensorProto()
            out.CopyFrom(tp)
            out.name = graph_name
            del out.dims[:]
            out.dims.extend(list(shape))
            return out
        ext = {e.key: e.value for e in tp.external_data}
        if self._fd is None:
            import os

            self._fd = os.open(self.path, os.O_RDONLY)
        return Stored(self._fd, int(ext["offset"]), int(ext["length"]), torch.float32, tuple(shape), str(self.path))

    def close(self) -> None:
        """Stop the worker if still running and delete the scratch file."""
        import os

        self.cancel()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)
