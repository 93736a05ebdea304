"""A base seen through its logical tensor names: the quantized weights a layered source knows (`specs`: name →
a spec with `.shape`, `.dtype`, `.weight` and `.aux` tensors) served dequantized by the owner's `get`, their aux
tensors (scales, quant states) hidden. Shared by the bitsandbytes, fp8 and MXFP4 sources."""

from __future__ import annotations

import math

import torch

from loraport.checkpoint import Checkpoint, Shard
from loraport.safetensors_io import TensorInfo, tensor_bytes


class LogicalFile:
    """One stored shard seen through the logical names: quantized weights dequantized, aux tensors hidden."""

    def __init__(self, owner: DequantizedView, shard: Shard, keys: list[str]):
        self._owner = owner
        self._shard = shard
        self.path = shard.file.path
        self.metadata = dict(shard.file.metadata)
        self._keys = keys
        self.tensors: dict[str, TensorInfo] = {}
        for k in keys:
            spec = owner.specs.get(shard.prefix + k)
            if spec is None:
                self.tensors[k] = shard.file.tensors[k]
            else:
                n = math.prod(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()
                self.tensors[k] = TensorInfo(k, spec.dtype, spec.shape, 0, n)

    def names(self) -> list[str]:
        return list(self._keys)

    def get(self, key: str) -> torch.Tensor:
        spec = self._owner.specs.get(self._shard.prefix + key)
        if spec is None:
            return self._shard.file.get(key)
        return self._owner.get(self._shard.prefix + key)

    def raw(self, key: str) -> memoryview:
        spec = self._owner.specs.get(self._shard.prefix + key)
        if spec is None:
            return self._shard.file.raw(key)
        return tensor_bytes(self.get(key))

    def span(self, key: str):
        """The stored bytes of an unquantized tensor, for the engine's kernel copy; None for a dequantized one."""
        if self._owner.specs.get(self._shard.prefix + key) is not None:
            return None
        span = getattr(self._shard.file, "span", None)
        return span(key) if span is not None else None

    def release(self, key: str) -> None:
        spec = self._owner.specs.get(self._shard.prefix + key)
        st = self._owner.stored
        for stored in ([key] if spec is None else [n for n in (spec.weight, *spec.aux.values())]):
            sh, k = (self._shard, key) if spec is None else st.shard_of(stored)
            release = getattr(sh.file, "release", None)
            if release is not None:
                release(k)

    def close(self) -> None:
        self._shard.file.close()


class DequantizedView(Checkpoint):
    """A Checkpoint over `stored` whose `specs` weights are served dequantized by `get` (subclasses define it)."""

    stored: Checkpoint
    specs: dict

    @classmethod
    def _view(cls, ck: Checkpoint, specs: dict):
        """The view of `ck` (config.json's quantization_config kept aside in `.quantization_config`)."""
        self = cls.__new__(cls)
        self.stored, self.specs = ck, specs
        hidden = {a for s in specs.values() for a in s.aux.values()}
        # a logical name may differ from its stored tensor's (MXFP4: `P` is stored as `P_blocks` + `P_scales`)
        renamed = {s.weight: n for n, s in specs.items() if s.weight != n}
        shards = []
        for sh in ck.shards:
            logical = Shard(sh.relpath, None, sh.prefix)  # type: ignore[arg-type]
            keys = [renamed.get(sh.prefix + k, sh.prefix + k)[len(sh.prefix):] for k in sh.file.names()
                    if sh.prefix + k not in hidden]
            logical.file = LogicalFile(self, sh, keys)
            shards.append(logical)
        cfg = dict(ck.config) if isinstance(ck.config, dict) else {}
        qc = cfg.pop("quantization_config", None)
        Checkpoint.__init__(self, ck.root, ck.kind, shards, cfg, list(ck.extra_files), list(ck.index_files))
        self.quantization_config = qc if isinstance(qc, dict) else None
        self.config_rewritten = qc is not None  # the output's config.json drops quantization_config
        return self
