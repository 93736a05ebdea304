"""`loraport formats`: the support matrix from the format registry."""

from __future__ import annotations

import click

from loraport.console import emit_json


def register(group: click.Group) -> None:
    group.add_command(formats_cmd)


@click.command("formats")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def formats_cmd(as_json):
    """List the adapter formats loraport reads, writes and merges."""
    from loraport.formats import formats, option_names, support_matrix

    if as_json:
        emit_json({n: {"title": f.title, "read": f.readable, "write": f.writable, "merge": f.mergeable,
                       "spec": f"formats/{f.spec or n}.md", "read_options": option_names(f.read_options),
                       "write_options": option_names(f.write_options) if f.writable else None}
                   for n, f in formats().items()})
    else:
        click.echo(support_matrix())
