"""Ctrl-C for the command line: one line, exit 130, never a traceback — whenever it comes.

When loraport *is* the process (the console script, `python -m loraport`), `loraport/__init__.py` installs the
handler before anything else loads. While the CLI starts (imports, argument parsing) a Ctrl-C is only
remembered: a KeyboardInterrupt raised inside the import machinery cannot be caught cleanly (it escapes as a
traceback of the import statement). Once the command runs, it raises KeyboardInterrupt as usual, so work
stops at once and staged outputs unwind; it is remembered too, because a KeyboardInterrupt can be swallowed —
by a C extension mid-import (seen in `import torch`, which then went on for seconds) or in a callback that
Python reports as "Exception ignored" (importlib's module locks). The CLI looks at the flag after its imports
and before the command, and the progress reporter at every step, so the run still stops.

In-process callers (tests, scripts calling `loraport.cli.main`) get the handler only while `main()` runs. Only
`signal`, `sys` and `threading` are imported here: this module loads with the package.
"""

from __future__ import annotations

import os
import sys
import threading

INTERRUPTED = "error: interrupted; nothing was written"


def interrupted() -> None:
    """Ctrl-C: one line, exit 130 (128 + SIGINT, what shells report), never a traceback."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting must not print one either
    except (ValueError, OSError):  # not the main thread
        pass
    try:
        sys.stderr.write(INTERRUPTED + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    raise SystemExit(130)


class Interrupts:
    def __init__(self):
        self.seen = threading.Event()
        self.raising = True
        self.installed = False
        self._old = self._old_hook = None

    def _handler(self, signum, frame):
        self.seen.set()
        if self.raising:
            raise KeyboardInterrupt

    def _unraisable(self, u) -> None:
        if u.exc_type is not None and issubclass(u.exc_type, KeyboardInterrupt):
            self.seen.set()  # silently: interrupted() prints the one line
        elif self._old_hook is not None:
            self._old_hook(u)

    def install(self, raising: bool = True) -> bool:
        """True when this call installed the handler (False: already installed, or not the main thread)."""
        import signal

        if self.installed:
            return False
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except (ValueError, OSError):
            return False
        self.raising = raising
        self._old_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        self.installed = True
        return True

    def uninstall(self) -> None:
        import signal

        if not self.installed:
            return
        try:
            signal.signal(signal.SIGINT, self._old)
        except (ValueError, OSError):
            return
        sys.unraisablehook = self._old_hook
        self.installed = False

    def start_work(self) -> None:
        """From here on a Ctrl-C raises; one that came while starting up stops the run now."""
        self.raising = True
        self.check()

    def check(self) -> None:
        if self.seen.is_set():
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()


def is_entry() -> bool:
    """Is this process `loraport` itself: the console script, or `python -m loraport`?"""
    argv = getattr(sys, "orig_argv", None) or []
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "loraport":
        return True
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("loraport", "loraport.exe")


def install_if_entry() -> None:
    if is_entry():
        INTERRUPTS.install(raising=False)
