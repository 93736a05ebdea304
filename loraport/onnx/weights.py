"""Where the exported graph's weights come from: the merge engine's source role, under the graph's names.

`WeightSource` opens the base checkpoint and the adapters once (NaN/Inf in an adapter checked as merge checks
it), and plans the merge with `loraport.engine.plan.build_plan`. `GraphSource` is what the engine's stream reads
for an export: the graph's initializers by name — a model parameter from the checkpoint tensor that holds it
(a missing model prefix, a tied head: `engine.sources.parameter_tensor`), a buffer from the capture — with the
plan re-keyed to those names. Reading, merging, rounding, the finite check and writing are the stream's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loraport.adapter import Adapter
from loraport.errors import BadInputError
from loraport.onnx.external import ONNX_TO_TORCH


class WeightSource:
    def __init__(self, base: str | Path, adapters: list[tuple[str | Path | Adapter, float]], device: str = "auto",
                 strict: bool = True, merge: bool = True, nonfinite: str = "warn"):
        from loraport.engine.device import pick_device
        from loraport.engine.plan import build_plan
        from loraport.engine.sources import open_base
        from loraport.finite import check_adapters, check_mode
        from loraport.formats import load_adapter

        self.nonfinite = check_mode(nonfinite)
        self.base_path = Path(base)
        if not self.base_path.is_dir() or not (self.base_path / "config.json").is_file():
            raise BadInputError(f"--base {base}: ONNX export needs a transformers model folder with config.json")
        self.ckpt = open_base(self.base_path)
        self.config = self.ckpt.config if isinstance(self.ckpt.config, dict) else {}
        self.device = pick_device(device)
        self.adapters: list[tuple[Adapter, float]] = [
            (a if isinstance(a, Adapter) else load_adapter(a, base=self.ckpt), float(w)) for a, w in adapters
        ]
        self.warnings = check_adapters(self.adapters, self.nonfinite)  # as merge does: warn, or refuse ("fail")
        # the multi-LoRA graph keeps the base weights unmerged; the adapters only go to .onnx_adapter files
        self.plan = build_plan(self.ckpt, self.adapters if merge else [], strict=strict)

    def checkpoint_name(self, name: str) -> str | None:
        """The checkpoint tensor that holds the model parameter `name`, or None."""
        from loraport.engine.sources import parameter_tensor

        return parameter_tensor(self.ckpt, name)

    def close(self) -> None:
        self.ckpt.close()


@dataclass(frozen=True)
class _Info:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class GraphSource:
    """The stream's source for an export (the interface of loraport.checkpoint.Checkpoint the stream uses, plus
    `where`). `specs`: the graph's initializers to serve (InitSpec), `buffers`: the capture's non-parameter
    tensors, served converted to their initializer's dtype."""

    def __init__(self, ws: WeightSource, specs, buffers: dict[str, torch.Tensor]):
        self.ws, self.ckpt = ws, ws.ckpt
        self.ck: dict[str, str] = {}  # graph name -> checkpoint tensor
        self.buffers: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
        self._names: list[str] = []
        for spec in specs:
            self._names.append(spec.name)
            if spec.name in buffers:
                self.buffers[spec.name] = (buffers[spec.name], ONNX_TO_TORCH[spec.onnx_dtype])
                continue
            ck = ws.checkpoint_name(spec.name)
            if ck is None:
                raise BadInputError(f"{ws.base_path}: the model built from config.json has a weight {spec.name!r} "
                                    "that the checkpoint does not contain (config and weights disagree?)")
            shape = tuple(self.ckpt.info(ck).shape)
            if math.prod(shape) != math.prod(spec.shape):
                raise BadInputError(f"{spec.name}: checkpoint shape {list(shape)} != model shape "
                                    f"{list(spec.shape)} (config.json and weights disagree)")
            self.ck[spec.name] = ck

    def plan(self):
        """The merge plan with its updates under the graph's names (a tied head and embedding both get them)."""
        from loraport.engine.plan import MergePlan

        ups = self.ws.plan.updates
        return MergePlan(self, self.ws.adapters, {g: ups[ck] for g, ck in self.ck.items() if ck in ups})

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str):
        if name in self.buffers:
            t, dt = self.buffers[name]
            return _Info(dt, tuple(t.shape), t.numel() * dt.itemsize)
        return self.ckpt.info(self.ck[name])

    def get(self, name: str) -> torch.Tensor:
        if name in self.buffers:
            t, dt = self.buffers[name]
            return t.to(dt)
        return self.ckpt.get(self.ck[name])

    def span(self, name: str) -> tuple[int, int, int] | None:
        return None if name in self.buffers else self.ckpt.span(self.ck[name])

    def where(self, name: str) -> str:
        return str(self.ckpt.shard_of(self.ck[name])[0].file.path) if name in self.ck else "the captured graph"

    def release(self, name: str) -> None:
        if name in self.ck:
            self.ckpt.release(self.ck[name])

    def layer_hint(self, name: str) -> str | None:
        return self.ckpt.layer_hint(self.ck[name]) if name in self.ck else None
