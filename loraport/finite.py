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


def may_be_nonfinite(t: torch.Tensor) -> bool:
    """False only when every value of `t` is finite, decided in one pass with no temporaries; True means "count
    exactly". fp32/fp64: a NaN or ±Inf makes the sum NaN or ±Inf (a sum that overflows also says True). 16-bit
    dtypes: NaN propagates through min/max and ±Inf lands at an end (their float32 sums run ~10x slower)."""
    if not t.is_floating_point() or t.numel() == 0:
        return False
    mask = _FP8_NONFINITE.get(t.dtype)
    if mask is not None:  # float8 codes: read the exponent bits, not a widened copy (converted one by one)
        return int((t.reshape(-1).view(torch.uint8) & mask).max()) == mask
    t = _widened(t)
    try:
        if t.dtype in (torch.float32, torch.float64):
            return not bool(torch.isfinite(t.sum()))
        lo, hi = torch.aminmax(t)
    except RuntimeError:  # a dtype without a sum / min-max kernel
        return True
    return not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)))


# float8 dtypes whose non-finite codes are those with every bit of `mask` set (sign aside): e4m3fn has no Inf and
# one NaN, S.1111.111; e5m2 is IEEE-like, exponent 11111 is ±Inf or NaN
_FP8_NONFINITE = {getattr(torch, n): m for n, m in (("float8_e4m3fn", 0x7F), ("float8_e5m2", 0x7C))
                  if hasattr(torch, n)}


def _widened(t: torch.Tensor) -> torch.Tensor:
    """float8 tensors have no isfinite / min-max kernels: fp16 holds every float8 value (NaN and ±Inf too)."""
    return t.to(torch.float16) if t.is_floating_point() and t.element_size() == 1 else t


def count_nonfinite(t: torch.Tensor) -> int:
    if not may_be_nonfinite(t):
        return 0
    return int((~torch.isfinite(_widened(t))).sum())


def check_adapters(adapters, mode: str = "warn") -> list[str]:
    """One message per adapter holding NaN/Inf values; raises in "fail" mode."""
    msgs = []
    for adapter, _ in adapters:
        hits = []
        for d in adapter.deltas:
            for k, t in d.named_tensors():
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
