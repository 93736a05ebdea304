"""Helpers shared by the LLM adapter formats (MLX, GGUF, torchtune, ONNX adapters): orientation, uniform
scale/rank for formats that store a single one, and config reading. Pure functions of deltas and tensors."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from loraport.adapter import Adapter, LoraDelta
from loraport.errors import BadInputError, Inexpressible
from loraport.names.llm import is_embedding


def oriented(d: LoraDelta, transpose: bool, base=None) -> LoraDelta:
    """The same ΔW expressed with `d.transpose == transpose` (swapping A/B: (B@A)ᵀ = Aᵀ@Bᵀ). A delta whose
    orientation is still undecided is settled against the base when given, else by its layer/name."""
    t = d.transpose
    if t is None:
        if base is not None and d.target in base:
            t = d.resolve(tuple(base.info(d.target).shape), base.layer_hint(d.target)).transpose
        else:
            t = d.layer in ("embedding", "conv1d") or (d.layer is None and is_embedding(d.target))
    if d.A.dim() != 2 or d.mid is not None:
        raise BadInputError(f"{d.target}: only 2-D LoRA factors can be written in this format (conv/Tucker found)")
    if bool(t) == transpose:
        return replace(d, transpose=transpose)
    axis = d.dora_axis
    if d.magnitude is not None:
        axis = "in" if axis == "out" else "out"
    return replace(d, A=d.B.t().contiguous(), B=d.A.t().contiguous(), transpose=transpose, dora_axis=axis)


def common_value(values: list[float]) -> float:
    """The most frequent value (ties: the first seen)."""
    return Counter(values).most_common(1)[0][0] if values else 1.0


def bake(B: torch.Tensor, factor: float) -> torch.Tensor:
    """B·factor computed in fp32, returned in B's dtype (fp32 inputs stay exact up to one rounding)."""
    if factor == 1.0:
        return B
    return (B.float() * factor).to(B.dtype)


def pad_rank(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad A's rows and B's columns to rank r: B@A is unchanged."""
    k = A.shape[-2] if A.dim() == 3 else A.shape[0]
    if k == r:
        return A, B
    if A.dim() == 3:
        A2 = torch.zeros(A.shape[0], r, A.shape[2], dtype=A.dtype)
        A2[:, :k] = A
        B2 = torch.zeros(B.shape[0], B.shape[1], r, dtype=B.dtype)
        B2[:, :, :k] = B
        return A2, B2
    A2 = torch.zeros(r, A.shape[1], dtype=A.dtype)
    A2[:k] = A
    B2 = torch.zeros(B.shape[0], r, dtype=B.dtype)
    B2[:, :k] = B
    return A2, B2


def require_lora_only(adapter: Adapter, fmt: str, stacked: bool = False) -> None:
    """Refuse any delta but LoRA factors (and, with `stacked`, stacked-expert LoRA) and any row slice."""
    for d in adapter.deltas:
        if not (d.has_lora_factors or (stacked and d.stacked)):
            raise Inexpressible(
                f"{fmt} cannot express the {d.kind} update on {d.target} (it stores LoRA factors only)"
            ).hint("--lossy", "re-factors it to low rank")
        if d.rows is not None:
            raise BadInputError(f"{fmt} cannot express a row-sliced update on {d.target} (fused projection)")


def positive_number(v, what: str, where) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise BadInputError(f"{where}: {what} must be a finite number, got {v!r}")
    return float(v)


def stack_experts(per: dict[int, LoraDelta], n: int, file_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert LoRA factors (oriented, by expert index) -> the stacked A [n, r, in] and B [n, out, r] that
    GGUF `*_exps` and MLX SwitchLinear store: r = the largest rank (others zero-padded), experts without
    LoRA zero, each B baked to the file's scale `file_scale(r)`. `n` is the base's expert count."""
    r = max(x.A.shape[0] for x in per.values())
    ref = next(iter(per.values()))
    A = torch.zeros(n, r, ref.A.shape[1], dtype=ref.A.dtype)
    B = torch.zeros(n, ref.B.shape[0], r, dtype=ref.B.dtype)
    s = file_scale(r)
    for e, x in per.items():
        if e >= n:
            raise BadInputError(f"{x.target}: expert index {e} beyond the base's {n} experts")
        k = x.A.shape[0]
        A[e, :k] = x.A
        B[e, :, :k] = bake(x.B, x.scale / s)
    return A, B
