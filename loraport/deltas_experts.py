"""LoRA on stacked mixture-of-experts weights.

Some checkpoints hold every expert of a layer in one tensor `[E, out, in]` (GGUF `ffn_gate_exps`, MLX
`switch_mlp`, transformers ≥ 5 in memory; transformers' `gate_up_proj` even fuses gate and up along the
output axis: `[E, 2·I, H]`). An `ExpertsLoraDelta` updates such a tensor: per expert e and per part p,
W[e, rows_p] += scale_p · B_p[e] @ A_p[e]. A part covering only a slice of the output axis is how gate and
up LoRAs land in a fused `gate_up_proj`. Per-expert checkpoints (transformers on disk) get plain
`LoraDelta`s instead, one per expert tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from loraport.adapter import Delta, Shape
from loraport.errors import PlanError


@dataclass
class ExpertPart:
    A: torch.Tensor  # [E, r, in]
    B: torch.Tensor  # [E, out, r]
    scale: float = 1.0
    out_rows: tuple[int, int] | None = None  # slice of axis 1 of the stacked tensor; None = all of it
    source_key: str = ""


@dataclass
class ExpertsLoraDelta(Delta):
    parts: list[ExpertPart] = field(default_factory=list)
    kind: ClassVar[str] = "lora-experts"
    stacked: ClassVar[bool] = True

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every part's factors, for the NaN/Inf check (they live inside `parts`, not as fields of the delta)."""
        return [(f"parts[{i}].{k}", t) for i, p in enumerate(self.parts) for k, t in (("A", p.A), ("B", p.B))]

    def __post_init__(self):
        if self.rows is not None:
            raise PlanError(f"{self.target}: stacked-expert updates do not take an axis-0 row slice")
        for p in self.parts:
            if p.A.dim() != 3 or p.B.dim() != 3 or p.A.shape[0] != p.B.shape[0] or p.A.shape[1] != p.B.shape[2]:
                raise PlanError(f"{self.target}: expert LoRA factors {list(p.A.shape)} / {list(p.B.shape)} "
                                "are not [E,r,in] / [E,out,r]")

    def implied_shape(self) -> Shape | None:
        if len(self.parts) == 1 and self.parts[0].out_rows is None:
            p = self.parts[0]
            return (p.A.shape[0], p.B.shape[1], p.A.shape[2])
        return None

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        if len(base_shape) != 3:
            raise PlanError(f"{self.target}: expected a stacked expert tensor [E,out,in], base has {list(base_shape)}")
        E, out, inn = base_shape
        for p in self.parts:
            a, b = p.out_rows or (0, out)
            if p.A.shape[0] != E or p.A.shape[2] != inn or p.B.shape[1] != b - a or not (0 <= a < b <= out):
                raise PlanError(
                    f"shape mismatch for {self.target}: adapter key {p.source_key or '?'} implies "
                    f"[{p.A.shape[0]}, {p.B.shape[1]}, {p.A.shape[2]}] at rows {p.out_rows}, base is {list(base_shape)}"
                )
        return replace(self)

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        d = torch.zeros_like(W, dtype=torch.float32)
        self.apply_(d)
        return d

    def apply_(self, W: torch.Tensor, weight: float = 1.0, base: torch.Tensor | None = None) -> None:
        for p in self.parts:
            a, b = p.out_rows or (0, W.shape[1])
            A = p.A.to(W.device, torch.float32)
            B = p.B.to(W.device, torch.float32)
            W[:, a:b, :].baddbmm_(B, A, alpha=weight * p.scale)

    def rank(self) -> int | None:
        return int(self.parts[0].A.shape[1]) if self.parts else None

    def num_params(self) -> int:
        return sum(p.A.numel() + p.B.numel() for p in self.parts)

    def describe(self) -> dict:
        d = super().describe()
        d.update(experts=int(self.parts[0].A.shape[0]) if self.parts else 0, parts=len(self.parts),
                 scale=[p.scale for p in self.parts])
        return d


def combine_stacked(deltas: list) -> list:
    """gate and up LoRAs of a fused gate_up tensor become one delta with two parts."""
    out, by_target = [], {}
    for d in deltas:
        if d.stacked and d.target in by_target:
            by_target[d.target].parts.extend(d.parts)
            continue
        if d.stacked:
            by_target[d.target] = d
        out.append(d)
    return out
