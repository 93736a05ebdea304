"""Shared output helpers for commands: rich tables/progress on stderr, JSON on stdout.

`err` carries progress and info lines, silenced by `--quiet` (`set_quiet`); `warn` and the CLI's error lines
print regardless. `Reporter` shows the engine's `loraport.progress` steps: rich bars on a terminal, and
elsewhere (CI logs, pipes) plain lines on stderr — a step's start once it has run a second, then a line every
$LORAPORT_PROGRESS_INTERVAL seconds (default 5), then its end — so a log never goes silent for long while
steps that take less than a second (cache hits, tiny models, early errors) print nothing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager



class _Lazy:
    """A rich Console made on first use: importing rich costs tens of ms that `loraport --help` need not pay."""

    def __init__(self, **options):
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_set", {})  # attributes set before the console exists (e.g. quiet)
        object.__setattr__(self, "_console", None)

    def _get(self):
        if self._console is None:
            from rich.console import Console

            c = Console(**self._options)
            for k, v in self._set.items():
                setattr(c, k, v)
            object.__setattr__(self, "_console", c)
        return self._console

    def __getattr__(self, name):
        if self._console is None and name in self._set:
            return self._set[name]
        return getattr(self._get(), name)

    def __setattr__(self, name, value):
        if self._console is None:
            self._set[name] = value
        else:
            setattr(self._console, name, value)


err = _Lazy(stderr=True, highlight=False, soft_wrap=True)
out = _Lazy(highlight=False, soft_wrap=True)
_warn = _Lazy(stderr=True, highlight=False, soft_wrap=True)


def set_quiet(quiet: bool) -> None:
    """--quiet: no progress, no info lines (errors and warnings still print). Reset by every invocation."""
    err.quiet = bool(quiet)


def is_quiet() -> bool:
    return bool(err.quiet)


def warn(message: str) -> None:
    """A warning (plain text, not markup): printed even with --quiet."""
    from rich.markup import escape

    _warn.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True)


def always(message: str) -> None:
    """A line of a command's result (markup allowed) that --quiet keeps, like warnings and errors (e.g. what
    `verify` found changed)."""
    _warn.print(message, markup=True)


def emit_json(obj, compact: bool = False) -> None:
    """`compact`: one line (a JSON-lines record)."""
    sys.stdout.write(json.dumps(obj, indent=None if compact else 2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(description: str, total: float | None, enabled: bool = True, unit: str = ""):
    """A step of a command itself, shown like the engine's (`Reporter`); yields `advance(n)`."""
    from loraport.progress import step

    if not enabled:
        yield lambda n=1: None
        return
    with step(description, total=total, unit=unit) as advance:
        yield lambda n=1: advance(n)


def _amount(done: float | None, total: float | None, unit: str) -> str:
    """'12/40 tensors', '1.2/3.9 GB'; `done` None: just the total; `total` None: just what is done."""
    if unit == "B":
        d, t = (human_bytes(x) if x is not None else None for x in (done, total))
        if d is None or t is None:
            return d or t or ""
        dn, du = d.rsplit(" ", 1)
        tn, tu = t.rsplit(" ", 1)
        return f"{dn}/{tn} {tu}" if du == tu else f"{d}/{t}"
    nums = "/".join(f"{x:g}" for x in (done, total) if x is not None)
    return nums + (f" {unit}" if unit else "")


GRACE_S = 1.0  # plain lines: a step that ends sooner prints nothing (a cache hit, a tiny model, an early error)


class _Step:
    """One running step's counters (advanced from the step's thread, read by the ticker and the bars)."""

    def __init__(self, name: str, total, unit: str, items, item_unit: str):
        self.name, self.total, self.unit, self.items, self.item_unit = name, total, unit, items, item_unit
        self.done = 0.0
        self.items_done = 0
        self.t0 = self.last_line = time.monotonic()
        self.task = None
        self.announced = False  # plain lines: its start line was printed (it outlasted the grace period)

    def status(self, when: str = "now") -> str:
        """"start": the totals; "now": done/total; "end": what was done."""
        parts = []
        for done, total, unit in ((self.items_done, self.items, self.item_unit), (self.done, self.total, self.unit)):
            if total is None and not done:
                continue
            parts.append(_amount(None if when == "start" else done, None if when == "end" else total, unit))
        return ", ".join(p for p in parts if p)


class Reporter:
    """A `loraport.progress` reporter for the CLI. Asks `is_quiet()` when each step starts, so --quiet given
    after the reporter was installed (a command's own option) still silences it."""

    def __init__(self, stream=None, interval: float | None = None, tty: bool | None = None, interrupted=None):
        self._interrupted = interrupted  # an Event set by a Ctrl-C that may have been swallowed: stop at a step
        self._stream = stream
        self._interval = interval
        self._tty = tty
        self._lock = threading.Lock()
        self._active: list[_Step] = []
        self._ticker: threading.Thread | None = None
        self._wake = threading.Event()
        self._bars = None

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    @property
    def interval(self) -> float:
        if self._interval is not None:
            return self._interval
        try:
            return max(0.05, float(os.environ.get("LORAPORT_PROGRESS_INTERVAL", "5")))
        except ValueError:
            return 5.0

    def _is_tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        return err.is_terminal and self._stream is None

    def _check(self) -> None:
        if self._interrupted is not None and self._interrupted.is_set():
            raise KeyboardInterrupt

    @contextmanager
    def __call__(self, name: str, total=None, unit: str = "", items=None, item_unit: str = ""):
        self._check()
        if is_quiet() or os.environ.get("LORAPORT_NO_PROGRESS", "") not in ("", "0"):
            yield lambda n=0, items=0: self._check()
            return
        st = _Step(name, total, unit, items, item_unit)
        tty = self._is_tty()
        with self._lock:
            self._active.append(st)
            if tty:
                self._bar_start(st)
        if not tty:
            self._ensure_ticker()

        def advance(n: float = 0, items: int = 0) -> None:
            self._check()
            st.done += n
            st.items_done += items
            if st.task is not None:
                self._bar_update(st, n)

        ok = False
        try:
            yield advance
            ok = True
        finally:
            with self._lock:
                self._active.remove(st)
                if tty:
                    self._bar_stop(st)
                if ok and not tty and st.announced:  # a step that ended within the grace period stays silent
                    done = st.status("end")
                    self._line(f"[{name}] done" + (f": {done}" if done else "")
                               + f" in {time.monotonic() - st.t0:.1f} s")

    def _line(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not fail the work
            pass

    def _ensure_ticker(self) -> None:
        with self._lock:
            if self._ticker is not None and self._ticker.is_alive():
                return
            self._ticker = threading.Thread(target=self._tick, name="loraport-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        """A step's start line once it has run GRACE_S (or `interval`, if shorter), then one line per step that
        printed nothing for `interval`; ends when no step is running."""
        while True:
            iv = self.interval
            self._wake.wait(min(iv, GRACE_S) / 2)
            now = time.monotonic()
            with self._lock:  # (lines printed under the lock: a step's end line can never come before its start)
                if not self._active:
                    self._ticker = None
                    return
                for s in self._active:
                    if now - s.last_line < (iv if s.announced else min(iv, GRACE_S)):
                        continue
                    s.last_line = now
                    if not s.announced:
                        s.announced = True
                        start = s.status("start")
                        self._line(f"[{s.name}] start" + (f": {start}" if start else ""))
                    else:
                        status = s.status()
                        self._line(f"[{s.name}] " + (f"{status}, " if status else "") + f"{now - s.t0:.1f} s")

    # --- rich bars on a terminal (one Progress for every concurrent step; rich allows one live display)
    def _bar_start(self, st: _Step) -> None:
        if self._bars is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
                                  console=err._get() if isinstance(err, _Lazy) else err)
            self._bars.start()
        total = st.total if st.total is not None else st.items
        st.task = self._bars.add_task(st.name, total=total, amount=st.status())

    def _bar_update(self, st: _Step, n: float) -> None:
        bars = self._bars
        if bars is not None:
            done = st.done if st.total is not None else st.items_done
            bars.update(st.task, completed=done, amount=st.status())

    def _bar_stop(self, st: _Step) -> None:
        if self._bars is not None and st.task is not None:
            self._bars.remove_task(st.task)
            st.task = None
            if not self._active:
                self._bars.stop()
                self._bars = None


def next_validate(out: str, base: str, adapters: list[tuple[str, float]]) -> str:
    """The summary's last line: the command that checks what was just written."""
    import shlex

    cmd = ["loraport", "validate", str(out), "--base", str(base)]
    for a, _ in adapters:
        cmd += ["--adapter", str(a)]
    if any(float(w) != 1.0 for _, w in adapters):
        for _, w in adapters:
            cmd += ["--weight", f"{float(w):g}"]
    return "next: " + " ".join(shlex.quote(c) for c in cmd)


def path_size(p) -> int:
    """Bytes of a file, or of every file under a folder."""
    from pathlib import Path

    p = Path(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def parse_size(s: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    from loraport.errors import BadInputError

    t = s.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "B": 1}
    num, mul = t, 1
    for u, m in units.items():
        if t.endswith(u):
            num, mul = t[: -len(u)], m
            break
    try:
        v = float(num)
    except ValueError:
        raise BadInputError(f"cannot read size {s!r} (try e.g. 5GB or 500MB)") from None
    if v <= 0:
        raise BadInputError(f"size must be positive: {s!r}")
    return int(v * mul)
