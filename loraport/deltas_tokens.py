"""Trained token rows (PEFT TrainableTokens, `trainable_token_indices`): a few rows of an embedding (or of the
head tied to it) set to trained values, the rest of the matrix untouched. PEFT stores the new rows whole (not a
difference) and merges with `index_copy`, so the update is W[i] ← V[i] for i in `indices`; with a weight w it is
W[i] + w·(V[i] − W[i])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from loraport.adapter import Delta, Shape
from loraport.errors import PlanError


@dataclass
class TokenRowsDelta(Delta):
    """Rows `indices` of the target set to `values` ([len(indices), dim])."""

    indices: tuple[int, ...] = ()
    values: torch.Tensor = None  # type: ignore[assignment]

    kind: ClassVar[str] = "token_rows"
    sets_values: ClassVar[bool] = True

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.values,)

    def trained_rows(self) -> tuple[tuple[int, ...], torch.Tensor]:
        return self.indices, self.values

    def resolve(self, base_shape: Shape, hint: str | None = None) -> Delta:
        have = self._sliced(base_shape)
        if len(have) != 2 or tuple(self.values.shape[1:]) != tuple(have[1:]):
            raise PlanError(f"shape mismatch for {self.target}: adapter key {self.source_key or '?'} holds rows of "
                            f"{list(self.values.shape[1:])}, base tensor is {list(have)}")
        if self.indices and max(self.indices) >= have[0]:
            raise PlanError(f"{self.target}: adapter key {self.source_key or '?'} trains token {max(self.indices)}, "
                            f"but the tensor has {have[0]} rows (was the vocabulary resized? merge the adapter's "
                            "saved embedding with it)")
        return self

    def _index(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.indices, dtype=torch.long, device=device)

    def contribution(self, W: torch.Tensor) -> torch.Tensor:
        d = torch.zeros_like(W)
        idx = self._index(W.device)
        d[idx] = self.values.to(device=W.device, dtype=torch.float32) - W[idx]
        return d

    def apply_(self, W: torch.Tensor, weight: float = 1.0, base: torch.Tensor | None = None) -> None:
        ref = W if base is None else base
        tgt = W if self.rows is None else W[self.rows[0]:self.rows[1]]
        ref = ref if self.rows is None else ref[self.rows[0]:self.rows[1]]
        idx = self._index(W.device)
        v = self.values.to(device=W.device, dtype=torch.float32)
        if weight == 1.0 and base is None:
            tgt.index_copy_(0, idx, v)  # PEFT's own merge: the trained rows, bit for bit
        else:
            tgt.index_add_(0, idx, (v - ref[idx]) * weight)

    @property
    def depends_on_base(self) -> bool:
        return True

    def num_params(self) -> int:
        return self.values.numel()

    def describe(self) -> dict:
        d = super().describe()
        d["tokens"] = len(self.indices)
        return d
