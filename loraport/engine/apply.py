"""Apply: the pure per-tensor math W' = W + Σ wᵢ·ΔWᵢ in fp32 on any device. No I/O: the stream hands in the
base tensor (or the plan's base reads it) and takes the result."""

from __future__ import annotations

import torch

from loraport.adapter import Delta
from loraport.engine.plan import MergePlan


def merged_tensor(plan: MergePlan, name: str, device: torch.device | str = "cpu",
                  base_tensor: torch.Tensor | None = None, copy: bool = True) -> torch.Tensor:
    """The merged tensor `name` in fp32 on `device` (the base tensor upcast when nothing updates it).
    copy=False: `base_tensor` is a private fp32 tensor on `device` and is merged in place."""
    device = torch.device(device)
    src = plan.base.get(name) if base_tensor is None else base_tensor
    W = src.to(device=device, dtype=torch.float32, copy=copy or base_tensor is None)
    ups = plan.updates.get(name, ())
    # replacements (modules_to_save, PEFT's saved base_layer) define the base the other deltas apply to
    for d, w in ups:
        if d.replaces_base:
            W = d.replaced(W, w)  # a new tensor when it resizes the vocabulary
    rest = [(d, w) for d, w in ups if not d.replaces_base]
    ref = W.clone() if len(rest) > 1 and any(d.depends_on_base for d, _ in rest) else None
    plain = [(d, w) for d, w in rest if _plain_lora(d, W)]
    if len(plain) >= FUSE_MIN:  # many adapters: one GEMM over the stacked ranks instead of one pass per adapter
        rest = [(d, w) for d, w in rest if not _plain_lora(d, W)]
        for flag in (False, True):
            group = [(f, w) for d, w in plain if bool((f := d.low_rank_factors()).transpose) == flag]
            if group:
                A = torch.cat([f.A.to(device=W.device, dtype=torch.float32) for f, _ in group])
                B = torch.cat([f.B.to(device=W.device, dtype=torch.float32) * (w * f.scale) for f, w in group], 1)
                if flag:
                    W.addmm_(A.t(), B.t())
                else:
                    W.addmm_(B, A)
    for d, w in rest:
        d.apply_(W, w, base=ref)
    return W


# Plain 2-D LoRA deltas on one tensor from this many adapters are applied as one GEMM over their stacked ranks
# (W += [B₁w₁s₁ … Bₙwₙsₙ]·[A₁; …; Aₙ]): one pass over W instead of n. The sum is rounded in a different order
# than n sequential updates (differences at fp32 rounding level, far below fp16/bf16 output resolution), so
# one or two adapters keep the sequential path, which is bit-identical with applying them one by one.
FUSE_MIN = 3


def _plain_lora(d: Delta, W: torch.Tensor) -> bool:
    return d.plain_lora and d.rows is None and W.dim() == 2

