"""The command line: a thin click layer over the Python API.

Commands live in `loraport/commands/<name>.py`, each exposing `register(group)`; they are discovered here so
that adding a command never means editing a shared switch. A `LoraportError` becomes one line on stderr and
its exit code (2 bad input / usage, 1 failure); an unexpected exception also prints one line (set
LORAPORT_DEBUG=1 for the traceback). Ctrl-C at any moment — while this module's imports load, while the
arguments are parsed, during the work — prints one line and exits 130 (loraport/interrupts.py).

Nothing heavy (torch, numpy, onnx, safetensors, transformers) is imported here or by `commands/` at import
time: a command imports what it needs when it runs, so `loraport --help` answers in a fraction of a second.
"""

from __future__ import annotations

import gc
import importlib
import os
import pkgutil
import sys

from loraport.interrupts import INTERRUPTS, interrupted

try:  # the console script imports this module before any of our code can catch a Ctrl-C
    import click

    from loraport._version import __version__
    from loraport.errors import LoraportError
except KeyboardInterrupt:
    interrupted()


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's standalone main, except that Ctrl-C (which click reports as "Aborted!", exit 1) is ours."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        here = INTERRUPTS.install()  # in-process callers; the process's entry has had it from the start
        if here:  # (a flag left from an earlier in-process run is not this run's)
            INTERRUPTS.seen.clear()
        try:
            INTERRUPTS.start_work()  # stops here on a Ctrl-C that came while the imports loaded
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.Abort as e:  # click turns a Ctrl-C while parsing into Abort
            if isinstance(e.__cause__, KeyboardInterrupt):
                interrupted()
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            interrupted()
        finally:
            if here and not INTERRUPTS.seen.is_set():  # exiting on Ctrl-C: keep ignoring a second one
                INTERRUPTS.uninstall()
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        from loraport.api import cli_wording

        try:
            from loraport import progress
            from loraport.console import Reporter

            # the engine's long steps, shown on stderr (not with --quiet); errors keep naming the flags
            # (--shard-size), not the API's arguments
            with progress.reporting(Reporter(interrupted=INTERRUPTS.seen)), cli_wording():
                INTERRUPTS.check()
                rv = super().invoke(ctx)
            if not os.environ.get("LORAPORT_NO_GC_FREEZE"):
                # the command is done: keep the interpreter's tear-down from walking every object that torch,
                # transformers and onnxscript created (measured 1.36 s -> 0.16 s after an ONNX capture)
                gc.freeze()
            return rv
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            interrupted()
        except Exception as e:  # noqa: BLE001 - one line for the user whatever it was
            if INTERRUPTS.seen.is_set():  # what failed after a Ctrl-C failed because of it: a KeyboardInterrupt
                interrupted()  # swallowed mid-import leaves numpy half-loaded, and its next import raises ImportError
            _fail(self, ctx, e)


def _fail(group: click.Group, ctx: click.Context, e: Exception) -> None:
    """The one line (and exit status) for an error a command raised."""
    if isinstance(e, LoraportError):
        click.echo(f"error: {e}{_hint(group, ctx, e)}", err=True)
        sys.exit(e.exit_code)
    if isinstance(e, MemoryError):
        click.echo("error: out of memory", err=True)
        sys.exit(1)
    if os.environ.get("LORAPORT_DEBUG"):
        raise e
    if isinstance(e, OSError):
        click.echo(f"error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", err=True)
        sys.exit(1)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""  # a bug, but still one line for the user
    click.echo(f"error: {type(e).__name__}: {msg} (internal error; LORAPORT_DEBUG=1 shows the traceback)", err=True)
    sys.exit(1)


def _hint(group: click.Group, ctx: click.Context, e: LoraportError) -> str:
    """The error's flag hint, when the command that failed accepts that flag ("" otherwise)."""
    if not e.flag_hint:
        return ""
    flag, does = e.flag_hint
    cmd = group.get_command(ctx, ctx.invoked_subcommand or "")
    opts = {o for p in (cmd.params if cmd else []) for o in (*p.opts, *getattr(p, "secondary_opts", []))}
    return f" ({flag} {does})" if flag in opts else ""


def _set_quiet(ctx, param, value) -> None:
    if value or ctx.parent is None:  # the group's flag resets every invocation; a command's can only add
        from loraport.console import set_quiet

        set_quiet(value or os.environ.get("LORAPORT_QUIET", "") not in ("", "0"))


QUIET_HELP = "no progress or info lines on stderr (warnings and errors still print); LORAPORT_QUIET=1 sets it"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="loraport")
@click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
              help=QUIET_HELP)
def main() -> None:
    """Merge, convert, re-quantize and export LoRA / QLoRA adapters, with parity checks."""


def _add_quiet(cmd: click.Command) -> None:
    """Every command takes -q/--quiet too (`loraport merge ... -q`), without each defining it."""
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _add_quiet(sub)
    taken = {o for p in cmd.params for o in p.opts}
    if "--quiet" not in taken:  # (a command that defines -q for itself keeps it)
        cmd.params.append(click.Option(["--quiet"] if "-q" in taken else ["-q", "--quiet"], is_flag=True,
                                       expose_value=False, is_eager=True, callback=_set_quiet, help=QUIET_HELP))


def _discover() -> None:
    from loraport import commands

    for m in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"loraport.commands.{m.name}").register(main)
    for cmd in main.commands.values():
        _add_quiet(cmd)


try:
    _discover()
    if INTERRUPTS.installed:
        INTERRUPTS.check()
except KeyboardInterrupt:
    interrupted()
