"""`loraport resize`: an adapter at a lower rank, by the exact SVD of each B·A (never forming ΔW)."""

from __future__ import annotations

import click

from loraport.commands._lowrank_cli import common_options, rank_options, report


def register(group: click.Group) -> None:
    group.add_command(resize_cmd)


@click.command("resize")
@click.argument("adapter", type=click.Path())
@rank_options
@click.option("--out", required=True, type=click.Path(), help="the adapter to write")
@click.option("--to", "to", default=None, help="output format (default: the input's when writable, else peft)")
@click.option("--format", "fmt", default=None, help="force the input format (default: detect)")
@click.option("--base", default=None, type=click.Path(), help="base model, for formats whose keys need it (kohya)")
@common_options
def resize_cmd(adapter, rank, energy, max_rank, out, to, fmt, base, dtype, device, overwrite, as_json):
    """Re-factor every LoRA layer at --rank (or the rank keeping --energy of Σσ²). The result is the best
    approximation at that rank (Eckart–Young); each layer's relative error is reported. DoRA magnitudes are
    kept."""
    from loraport.lowrank import resize

    rep = resize(adapter, out, rank=rank, energy=energy, max_rank=max_rank, to=to, fmt=fmt, base=base,
                 dtype=dtype, device=device, overwrite=overwrite)
    report(rep, as_json, "resized LoRA")
