"""Where the exported graph's weights come from: the merge engine, tensor by tensor.

`WeightSource` opens the base checkpoint and the adapters once, plans the merge with
`loraport.engine.plan.build_plan`, and serves `merged(name)` (fp32, on the device) for the parameter names the
graph uses, translating them to the checkpoint's own spelling (a missing model prefix, tied heads).

Memory: base tensors are read with pread into private buffers, never through the memory map (mapped file
pages count in the resident set until unmapped). A tensor no adapter touches is not materialised at all:
`stored(name)` hands back where its bytes are, and the writer copies (or converts) them in bounded pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraport.adapter import Adapter
from loraport.errors import BadInputError
from loraport.safetensors_io import read_into


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes lie in a base file: copied or converted piecewise by ExternalDataWriter.add_stored."""

    fd: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: str


class WeightSource:
    def __init__(self, base: str | Path, adapters: list[tuple[str | Path | Adapter, float]], device: str = "auto",
                 strict: bool = True, merge: bool = True):
        from loraport.engine.device import pick_device
        from loraport.engine.plan import build_plan
        from loraport.engine.sources import open_base
        from loraport.formats import load_adapter

        self.base_path = Path(base)
        if not self.base_path.is_dir() or not (self.base_path / "config.json").is_file():
            raise BadInputError(f"--base {base}: ONNX export needs a transformers model folder with config.json")
        self.ckpt = open_base(self.base_path)
        self.config = self.ckpt.config if isinstance(self.ckpt.config, dict) else {}
        self.device = pick_device(device)
        self.adapters: list[tuple[Adapter, float]] = [
            (a if isinstance(a, Adapter) else load_adapter(a, base=self.ckpt), float(w)) for a, w in adapters
        ]
        # the multi-LoRA graph keeps the base weights unmerged; the adapters only go to .onnx_adapter files
        self.plan = build_plan(self.ckpt, self.adapters if merge else [], strict=strict)
        self._raw: torch.Tensor | None = None  # reused read buffer (uint8)
        self._w32: torch.Tensor | None = None  # reused fp32 buffer a 16-bit tensor is merged in

    # names -----------------------------------------------------------------------------------------
    def checkpoint_name(self, name: str) -> str | None:
        """The checkpoint tensor that holds the model parameter `name`, or None."""
        from loraport.engine.sources import parameter_tensor

        return parameter_tensor(self.ckpt, name)

    def _ck(self, name: str) -> str:
        ck_name = self.checkpoint_name(name)
        if ck_name is None:
            raise BadInputError(f"{self.base_path}: the model built from config.json has a weight {name!r} that "
                                "the checkpoint does not contain (config and weights disagree?)")
        return ck_name

    def stored(self, name: str) -> Stored | None:
        """For a model parameter no adapter touches, stored in a plain safetensors file: where its bytes are
        (to be copied or converted piecewise, never held whole). None when it must go through `merged`."""
        ck_name = self._ck(name)
        if ck_name in self.plan.updates:
            return None
        span = self.ckpt.span(ck_name)
        if span is None:
            return None
        info = self.ckpt.info(ck_name)
        path = str(self.ckpt.shard_of(ck_name)[0].file.path)
        return Stored(span[0], span[1], span[2], info.dtype, tuple(info.shape), path)

    def merged(self, name: str, want: torch.dtype | None = None) -> torch.Tensor:
        """The merged tensor for model parameter `name`: fp32, or — for a tensor no adapter touches — the
        stored tensor itself when `want` is its dtype (no fp32 round trip, one buffer). On CPU the result
        lives in a buffer this source reuses: it is valid until the next call."""
        from loraport.engine.apply import merged_tensor

        ck_name = self._ck(name)
        raw = self._read(ck_name)
        if raw is not None and ck_name not in self.plan.updates and raw.dtype == want:
            return raw
        if raw is not None and self.device.type == "cpu":
            if raw.dtype == torch.float32:
                W = raw  # a private fp32 buffer already: merged into in place
            else:
                W = self._grow("_w32", raw.numel(), torch.float32)[: raw.numel()].view(raw.shape)
                W.copy_(raw)
            return merged_tensor(self.plan, ck_name, self.device, base_tensor=W, copy=False)
        return merged_tensor(self.plan, ck_name, self.device, base_tensor=raw)

    def _read(self, name: str) -> torch.Tensor | None:
        """The base tensor read (pread, not through the memory map) into a reused private buffer."""
        span = self.ckpt.span(name)
        if span is None:
            return None  # not a plain safetensors checkpoint (e.g. a dequantizing view): let the engine read it
        info = self.ckpt.info(name)
        fd, offset, nbytes = span
        if not nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = self._grow("_raw", nbytes, torch.uint8)[:nbytes]
        if read_into(fd, memoryview(buf.numpy()), offset) != nbytes:
            raise BadInputError(f"{self.ckpt.shard_of(name)[0].file.path}: truncated while reading {name}")
        return buf.view(info.dtype).reshape(info.shape)

    def _grow(self, attr: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of at least n elements, kept for the next tensor: one block reused instead of a fresh
        allocation per tensor (freed blocks of varying sizes fragment the C heap and stay resident)."""
        buf = getattr(self, attr)
        if buf is None or buf.numel() < n:
            setattr(self, attr, None)
            buf = torch.empty(n, dtype=dtype)
            setattr(self, attr, buf)
        return buf

    def release(self) -> None:
        """Drop the reused buffers (the next read allocates them again)."""
        self._raw = self._w32 = None

    def close(self) -> None:
        self.release()
        self.ckpt.close()
