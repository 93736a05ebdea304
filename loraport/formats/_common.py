"""Small pieces shared by several format readers."""

from __future__ import annotations

import math

from loraport.errors import BadInputError


def lora_scale(alpha: float, r: int, rs: bool = False) -> float:
    """alpha/r (alpha/sqrt(r) for rsLoRA). A rank-0 LoRA has B·A = 0 (a no-op), so its scale is 0, not a
    division by zero."""
    if r == 0:
        return 0.0
    return alpha / math.sqrt(r) if rs else alpha / r


def check_unmatched(where, recognised: int, unrecognised: list[str], unmatched: list[str], strict: bool,
                    notes: set[str]) -> None:
    """Refuse (strict) or note (--no-strict) keys a reader did not recognise and modules the base lacks,
    saying what was recognised and giving examples of what was not."""
    if not unrecognised and not unmatched:
        return
    msg = (f"{where}: {recognised} module(s) recognised"
           + (f"; {len(unrecognised)} key(s) not recognised (e.g. {', '.join(unrecognised[:3])})"
              if unrecognised else "")
           + (f"; {len(unmatched)} module(s) not in the base (e.g. {', '.join(unmatched[:3])})"
              if unmatched else ""))
    if strict:
        raise BadInputError(msg + " — wrong base or mixed file?").hint("--no-strict", "skips them")
    notes.add(f"skipped {len(unrecognised) + len(unmatched)} unmatched key(s)/module(s)")
