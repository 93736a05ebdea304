"""What a capture produces, in a module of its own: the graph without weights and the initializers it expects
(`Captured`, `InitSpec`), and the LoRA branches of a multi-LoRA graph (`LoraSlot`). Tracing (capture.py), layer
cloning (replicate.py), the graph cache (graph_cache.py) and the export all read and write these records."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import torch


@dataclass
class InitSpec:
    name: str
    onnx_dtype: int
    shape: tuple[int, ...]


@dataclass
class LoraSlot:
    """One LoRA branch in a multi-LoRA graph: y += (x @ A) @ B with A [in, r], B [r, out]."""

    module: str  # module path, e.g. model.layers.0.self_attn.q_proj
    target: str  # the base weight it belongs to
    d_in: int
    d_out: int

    @property
    def a_name(self) -> str:
        return f"{self.module}.lora_A.weight"

    @property
    def b_name(self) -> str:
        return f"{self.module}.lora_B.weight"


@dataclass
class Captured:
    proto: onnx.ModelProto  # graph without initializers
    inits: list[InitSpec]
    buffers: dict[str, torch.Tensor]  # real values of non-parameter initializers
    input_names: list[str]
    model_type: str
    notes: list[str] = field(default_factory=list)
    lora_slots: list[LoraSlot] = field(default_factory=list)
    output_names: list[str] = field(default_factory=lambda: ["logits"])
    with_past: bool = False  # KV-cache inputs/outputs (layout: loraport/onnx/past.py)
