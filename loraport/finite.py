"""NaN/Inf checks: an adapter from a diverged run (or a hostile file) carries non-finite weights, and a merge
in fp16 can overflow to Inf. Both are reported — as a warning by default, or as a refusal with
`--fail-on-nonfinite` (`nonfinite="fail"`) before anything is renamed into place."""

from __future__ import annotations

import torch

from loraport.errors import BadInputError

MODES = ("warn", "fail")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise BadInputError(f"nonfinite must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def count_nonfinite(t: torch.Tensor) -> int:
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    # fast path: a NaN or ±Inf anywhere makes the sum NaN or ±Inf, so a finite sum proves every value finite
    # (one pass, no temporaries); a non-finite sum (or an overflow of it) is then counted exactly
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return 0
    return int((~torch.isfinite(t)).sum())


def _delta_tensors(d) -> list[tuple[str, torch.Tensor]]:
    fields = vars(d) if hasattr(d, "__dict__") else {}
    return [(k, v) for k, v in fields.items() if isinstance(v, torch.Tensor)]


def check_adapters(adapters, mode: str = "warn") -> list[str]:
    """One message per adapter holding NaN/Inf values; raises in "fail" mode."""
    msgs = []
    for adapter, _ in adapters:
        hits = []
        for d in adapter.deltas:
            for k, t in _delta_tensors(d):
                n = count_nonfinite(t)
                if n:
                    hits.append((d.source_key or d.target, k, n))
        if hits:
            total = sum(n for *_, n in hits)
            key, field, _ = hits[0]
            msg = (f"{adapter.path}: {total} non-finite value(s) (NaN/Inf) in {len(hits)} tensor(s), e.g. {key} "
                   f"({field}); the merged weights will be NaN/Inf there")
            if mode == "fail":
                raise BadInputError(msg + "; refused (--fail-on-nonfinite)")
            msgs.append(msg)
    return msgs


def check_merged(name: str, base_t: torch.Tensor, outs: list[torch.Tensor], mode: str = "warn") -> str | None:
    """A message if the merged output of `name` has more non-finite values than its base tensor had."""
    n_out = sum(count_nonfinite(o) for o in outs)
    if not n_out:
        return None
    n_base = count_nonfinite(base_t)
    if n_out <= n_base:
        return None
    msg = (f"{name}: the merged tensor has {n_out} non-finite value(s) (NaN/Inf; the base had {n_base}) — "
           "a NaN/Inf adapter, or an overflow of the output dtype")
    if mode == "fail":
        raise BadInputError(msg + "; refused (--fail-on-nonfinite)")
    return msg
