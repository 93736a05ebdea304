"""Per-tensor quantization quality, as pure functions of fp32 tensors.

rel_error = ‖Q(W) − W‖ / ‖W‖ · snr_db = 20·log10(‖W‖ / ‖Q(W) − W‖)
delta_survival = ‖Q(W + ΔW) − Q(W)‖ / ‖ΔW‖: the size of the change the adapter makes to the quantized weights
  relative to its own size (0 when rounding put the weights back on the base's codes; it can exceed 1 when ΔW
  is smaller than the grid step, because each flipped code moves a whole step).
delta_retained = ⟨Q(W + ΔW) − Q(W), ΔW⟩ / ‖ΔW‖²: the part of that change that points along ΔW — the fraction
  of the adapter that is really kept (≈1 when rounding dithers around W + ΔW, ≈0 when the adapter is erased).
  The "mostly erased" warning uses this one.
"""

from __future__ import annotations

import math

import torch

ERASED_BELOW = 0.5  # delta_survival under this: the adapter is mostly erased in that tensor


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.reshape(-1), dtype=torch.float32))


def rel_error(W: torch.Tensor, Wq: torch.Tensor) -> tuple[float, float]:
    """(relative error, SNR in dB) of a reconstruction Wq of W."""
    nw, ne = _norm(W), _norm(Wq - W)
    rel = ne / nw if nw > 0 else (0.0 if ne == 0 else math.inf)
    snr = math.inf if ne == 0 else (20 * math.log10(nw / ne) if nw > 0 else -math.inf)
    return rel, snr


def delta_survival(Wq_merged: torch.Tensor, Wq_base: torch.Tensor, delta: torch.Tensor) -> float | None:
    nd = _norm(delta)
    if nd == 0:
        return None
    return _norm(Wq_merged - Wq_base) / nd


def delta_retained(Wq_merged: torch.Tensor, Wq_base: torch.Tensor, delta: torch.Tensor) -> float | None:
    d = delta.reshape(-1)
    nd2 = float(torch.dot(d, d))
    if nd2 == 0:
        return None
    return float(torch.dot((Wq_merged - Wq_base).reshape(-1), d)) / nd2


def finite(x: float) -> float | None:
    """JSON-safe rounding: inf/nan become None."""
    return round(x, 6) if math.isfinite(x) else None


def record_delta(row: dict, Wq_merged: torch.Tensor, Wq_base: torch.Tensor, delta: torch.Tensor,
                 **changed: float) -> None:
    """A report row's adapter columns: delta_survival, delta_retained, then `changed` (codes / scales moved), and
    `erased` when less than ERASED_BELOW of the delta is kept — the same columns, in the same order, for every
    quantizer."""
    surv, kept = delta_survival(Wq_merged, Wq_base, delta), delta_retained(Wq_merged, Wq_base, delta)
    row.update(delta_survival=None if surv is None else finite(surv),
               delta_retained=None if kept is None else finite(kept), **changed)
    if kept is not None and kept < ERASED_BELOW:
        row["erased"] = True
