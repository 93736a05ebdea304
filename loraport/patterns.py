"""Rank/alpha patterns read from a file (PEFT's `rank_pattern` / `alpha_pattern`, diffusers'
`lora_adapter_metadata`), matched with PEFT's rule under bounded work on any thread.

PEFT's rule (peft.utils.other.get_pattern_key): the first key k, in the file's order, for which
`re.match(rf"(.*\\.)?({k})$", module)` succeeds gives the value. A key is an arbitrary regex from the file, and
Python's regex engine cannot be interrupted, so instead of a signal (main thread only) each key is checked
before use: it must parse, stay short, have no backreferences or lookarounds, no repeat inside a repeat and
at most `MAX_OPEN_REPEATS` long repeats — the shapes that backtrack exponentially or in high polynomial
degree. The `(.*\\.)?` prefix is not run through the engine: each start after a dot is tried with
`match(name, pos)` (which keeps `^` and `\\b` meaning the real start), plain-literal keys are looked up in a
dict, and one `Deadline` bounds the total time spent matching for an adapter.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager

from loraport.errors import BadInputError

try:  # Python >= 3.11
    from re import _constants as _C
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _C  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

MAX_PATTERNS = 65536  # keys per table (one per module of a large MoE adapter is legitimate)
MAX_PATTERN_LEN = 1024  # characters per key
MAX_NAME_LEN = 512  # characters of a module name matched against non-literal keys
MAX_OPEN_REPEATS = 3  # repeats of more than LONG_REPEAT items per key (each one multiplies the work by |name|)
LONG_REPEAT = 16
BUDGET_S = 2.0  # seconds of matching per adapter, all tables together

_REPEATS = {_C.MAX_REPEAT, _C.MIN_REPEAT} | ({_C.POSSESSIVE_REPEAT} if hasattr(_C, "POSSESSIVE_REPEAT") else set())
_REFUSED = {_C.GROUPREF: "a backreference", _C.GROUPREF_EXISTS: "a conditional backreference",
            _C.ASSERT: "a lookaround", _C.ASSERT_NOT: "a lookaround"}
if hasattr(_C, "GROUPREF_IGNORE"):
    _REFUSED[_C.GROUPREF_IGNORE] = "a backreference"


class Deadline:
    """A time budget shared by every pattern table of one adapter: only the time spent compiling and
    matching patterns is counted (not the rest of reading), and it is checked between matches."""

    def __init__(self, seconds: float = BUDGET_S):
        self.seconds = seconds
        self.spent = 0.0
        self._since: float | None = None

    @contextmanager
    def running(self):
        self._since = time.monotonic()
        try:
            yield
        finally:
            self.spent += time.monotonic() - self._since
            self._since = None

    def expired(self) -> bool:
        now = time.monotonic() - self._since if self._since is not None else 0.0
        return self.spent + now > self.seconds


def _children(op, av) -> list:
    """The sub-patterns of one parsed node."""
    if op == _C.SUBPATTERN:
        return [av[-1]]
    if op == _C.BRANCH:
        return list(av[1])
    if op in _REPEATS:
        return [av[2]]
    if getattr(_C, "ATOMIC_GROUP", None) is not None and op == _C.ATOMIC_GROUP:
        return [av]
    return []


def _has_choice(p) -> bool:
    """Whether `p` contains a repeat or an alternation (what makes a repeated body ambiguous)."""
    for op, av in p:
        if op in _REPEATS or op == _C.BRANCH or any(_has_choice(c) for c in _children(op, av)):
            return True
    return False


def _unsafe(p, counter: list[int]) -> str | None:
    """Why the parsed pattern `p` may take super-polynomial (or high-degree) time, or None."""
    for op, av in p:
        if op in _REFUSED:
            return f"uses {_REFUSED[op]}"
        if op in _REPEATS:
            lo, hi, body = av
            if hi > 1 and _has_choice(body):
                return "repeats a group that itself repeats or alternates (catastrophic backtracking)"
            if hi > LONG_REPEAT:
                counter[0] += 1
                if counter[0] > MAX_OPEN_REPEATS:
                    return f"has more than {MAX_OPEN_REPEATS} open-ended repeats"
        for c in _children(op, av):
            why = _unsafe(c, counter)
            if why:
                return why
    return None


def _literal(parsed) -> str | None:
    """The plain string a key matches when it has no regex syntax at all (the common, escaped case)."""
    if parsed.state.flags & (re.IGNORECASE | re.LOCALE):
        return None
    chars = []
    for op, av in parsed:
        if op != _C.LITERAL:
            return None
        chars.append(chr(av))
    return "".join(chars)


_PLAIN = re.compile(r"(?:[^\\.^$*+?{}\[\]|()]|\\[^A-Za-z0-9])*")  # no metacharacters; escapes of punctuation


def _plain(k: str) -> str | None:
    """The literal text of a key with no regex syntax (re.escape's output), found without the slow parser."""
    return re.sub(r"\\(.)", r"\1", k, flags=re.S) if _PLAIN.fullmatch(k) else None


class PatternTable:
    """One `{regex key: value}` table from a file, checked and compiled once, looked up with PEFT's rule."""

    def __init__(self, patterns, what: str, where: str, deadline: Deadline | None = None):
        self.what, self.where = what, where
        self.deadline = deadline or Deadline()
        if patterns is None:
            patterns = {}
        if not isinstance(patterns, dict):
            raise BadInputError(f"{where}: {what} must be an object of pattern -> value")
        if len(patterns) > MAX_PATTERNS:
            raise BadInputError(f"{where}: {what} has {len(patterns)} keys (at most {MAX_PATTERNS}); refused")
        self.items = list(patterns.items())
        self.literal: dict[str, int] = {}  # literal key -> first index
        self.regex: list[tuple[int, re.Pattern, int, int]] = []  # (index, compiled, min width, max width)
        with self.deadline.running():
            for i, (k, _) in enumerate(self.items):
                self._add(i, k)
                if i % 16 == 15:
                    self._check_time()

    def _refuse(self, key, why: str) -> BadInputError:
        return BadInputError(f"{self.where}: {self.what} key {str(key)[:60]!r} {why}; refused")

    def _add(self, i: int, k) -> None:
        if not isinstance(k, str):
            raise self._refuse(k, "is not a string")
        if len(k) > MAX_PATTERN_LEN:
            raise self._refuse(k, f"is {len(k)} characters long (at most {MAX_PATTERN_LEN})")
        plain = _plain(k)
        if plain is not None:
            self.literal.setdefault(plain, i)
            return
        try:
            parsed = _sre.parse(k)
            why = _unsafe(parsed, [0])
            if why:
                raise self._refuse(k, why)
            lit = _literal(parsed)
            if lit is not None:  # no engine needed: a dict lookup per dotted suffix
                self.literal.setdefault(lit, i)
                return
            rx = re.compile(rf"(?:{k})$")
        except (re.error, RecursionError, OverflowError, ValueError) as e:
            raise self._refuse(k, f"is not a valid regex ({str(e)[:80]})") from None
        lo, hi = parsed.getwidth()
        self.regex.append((i, rx, lo, hi))

    def _check_time(self) -> None:
        if self.deadline.expired():
            raise BadInputError(
                f"{self.where}: compiling and matching {self.what} ({len(self.items)} keys) against the "
                f"adapter's modules took over {self.deadline.seconds:g} s; refused (too many or too costly patterns)")

    def __len__(self) -> int:
        return len(self.items)

    def positive(self, name: str, default):
        """The value of the first key matching module `name` (PEFT's rule), else `default`; a matched value must
        be a positive finite number (ranks and alphas)."""
        hit = self.lookup(name)
        if hit is None:
            return default
        k, v = hit
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise BadInputError(f"{self.where}: {self.what}[{k[:60]!r}] must be a positive number, got {v!r}")
        return v

    def lookup(self, name: str):
        """(key, value) of the first key matching module `name` by PEFT's rule, or None."""
        if not self.items:
            return None
        with self.deadline.running():
            return self._lookup(name)

    def _lookup(self, name: str):
        starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
        if "\n" in name:  # `.*` does not cross a newline, so no dot after one can end the prefix
            cut = name.index("\n")
            starts = [s for s in starts if s == 0 or s - 1 < cut]
        best = len(self.items)
        for s in starts:
            tail = name[s:]
            for t in (tail, tail[:-1] if tail.endswith("\n") else None):
                j = self.literal.get(t) if t is not None else None
                if j is not None and j < best:
                    best = j
        if self.regex and len(name) > MAX_NAME_LEN:
            raise BadInputError(f"{self.where}: module name of {len(name)} characters is too long to match "
                                f"{self.what} against (at most {MAX_NAME_LEN}); refused")
        for i, rx, lo, hi in self.regex:
            if i >= best:
                break
            self._check_time()
            if any(lo <= len(name) - s and len(name) - s - 1 <= hi and rx.match(name, s) for s in starts):
                best = i
                break
        return self.items[best] if best < len(self.items) else None
