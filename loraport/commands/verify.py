"""`loraport verify OUT`: re-hash an output against the manifest loraport wrote with it."""

from __future__ import annotations

import sys

import click

from loraport.console import always, emit_json, err


def register(group: click.Group) -> None:
    group.add_command(verify_cmd)


@click.command("verify")
@click.argument("out", type=click.Path())
@click.option("--check-inputs", "--inputs", "check_inputs", is_flag=True, help="also re-hash the inputs the "
              "manifest lists (reports any that changed since the merge); --inputs is the older spelling")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable report on stdout")
def verify_cmd(out, check_inputs, as_json):
    """Check that every file of OUT still matches its loraport manifest (sha256 and size).
    Exit 0 when all match, 1 on any mismatch, 2 when OUT has no manifest."""
    from rich.markup import escape

    import loraport

    rep = loraport.verify(out, inputs=check_inputs).to_dict()
    bad = rep["problems"] + rep["inputs_changed"]
    if as_json:
        emit_json(rep)
    else:
        for p in bad:
            always(f"[red]mismatch[/red] {escape(p)}")  # the finding itself: kept with --quiet
        if rep["ok"]:
            err.print(f"ok: {rep['files_checked']} file(s) match {escape(rep['manifest'])}"
                      + ("" if not check_inputs else
                         f"; {len(rep['inputs_changed'])} input(s) changed" if rep["inputs_changed"]
                         else "; inputs unchanged"), markup=True)
        else:
            always(f"{len(rep['problems'])} problem(s) in {escape(str(out))}")
    if bad:
        sys.exit(1)
