"""The widened input projection of a Flux Control LoRA: BFL's Canny / Depth LoRAs train `img_in` (diffusers
`x_embedder`) on the noise latents and the control image's latents side by side, so their A has more input
columns than the base's weight. The base is widened with zero columns first (what diffusers'
`_maybe_expand_transformer_param_shape_or_error_` does to the module), then the LoRA adds B@A on the new shape:
the original inputs keep their weights, the new ones get only what the LoRA learned. Spec: formats/dit.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from loraport.adapter import Delta, Shape
from loraport.errors import PlanError


@dataclass
class WidenDelta(Delta):
    """W [out, in] → [W | 0] [out, columns]. `config_key` names the model config entry that states the width
    (in_channels), `keep_key` the entry that defaulted to it and must keep the old width (out_channels)."""

    columns: int = 0
    config_key: str = ""
    keep_key: str = ""

    kind: ClassVar[str] = "widen"
    replaces_base: ClassVar[bool] = True  # the LoRA on the same target applies to the widened tensor
    widens: ClassVar[bool] = True

    def output_shape(self, base_shape: Shape) -> Shape:
        return (base_shape[0], max(self.columns, base_shape[1])) if len(base_shape) == 2 else tuple(base_shape)

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        if len(base_shape) != 2 or self.rows is not None or base_shape[1] > self.columns:
            raise PlanError(f"{self.target}: cannot widen a {list(base_shape)} tensor to {self.columns} input "
                            f"columns ({self.source_key or 'control LoRA'})")
        return self

    def replaced(self, W: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Zero columns appended (whatever the weight: the LoRA's weight scales what it adds to them)."""
        if W.shape[1] >= self.columns:
            return W
        out = torch.zeros((W.shape[0], self.columns), dtype=torch.float32, device=W.device)
        out[:, : W.shape[1]] = W
        return out

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(W)

    def describe(self) -> dict:
        return {**super().describe(), "columns": self.columns}
