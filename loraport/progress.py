"""Progress of long steps: the engine announces them, the caller decides how (and whether) they look.

Engine code never prints. It wraps a long step in `step()` and calls the `advance` it yields:

    with progress.step("merge", total=nbytes, unit="B", items=len(names), item_unit="tensors") as advance:
        ...
        advance(n, items=1)

A caller that wants to see them installs a *reporter* around the call (the CLI's is in loraport/console.py):

    with progress.reporting(reporter):
        merge(...)

A reporter is any callable `reporter(name, total=, unit=, items=, item_unit=)` returning a context manager
that yields `advance(n=0, items=0)`. With none installed a step costs one context-variable look-up. Code that
runs a step on its own thread takes `current()` on the caller's thread and passes it as `reporter=`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Advance = Callable[..., None]

_reporter: ContextVar = ContextVar("loraport_progress_reporter", default=None)


def _noop(n: float = 0, items: int = 0) -> None:
    return None


def current():
    """The reporter installed on this thread's context (None: nobody is watching)."""
    return _reporter.get()


@contextmanager
def reporting(reporter) -> Iterator[None]:
    """Send the steps of the code inside to `reporter` (None: silence them)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


@contextmanager
def step(name: str, total: float | None = None, *, unit: str = "", items: int | None = None, item_unit: str = "",
         reporter=None) -> Iterator[Advance]:
    """One long step. `total` (in `unit`, "B" for bytes) and `items` (e.g. tensors) may be None when unknown;
    yields `advance(n, items=0)` to call as work completes."""
    r = reporter if reporter is not None else _reporter.get()
    if r is None:
        yield _noop
        return
    with r(name, total=total, unit=unit, items=items, item_unit=item_unit) as advance:
        yield advance


def each(things: Iterable, name: str, *, count: int | None = None, item_unit: str = "tensors",
         written: Callable[[], float] | None = None, size: Callable[[object], float] | None = None,
         total: float | None = None) -> Iterator:
    """Iterate `things` as one step, one item each. Bytes per item: `size(item)`, or the growth of `written()`
    (e.g. a writer's byte count) while the item was handled; `total` bytes if known. A loop over `each(...)`
    reports itself without changing its body."""
    unit = "B" if written or size else ""
    with step(name, total=total, unit=unit, items=count, item_unit=item_unit) as advance:
        for x in things:
            before = written() if written else 0
            yield x
            n = size(x) if size else (written() - before) if written else 0
            advance(n, items=1)
