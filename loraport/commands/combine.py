"""`loraport combine`: several adapters into one (cat, svd, ties, dare)."""

from __future__ import annotations

import click

from loraport.commands._lowrank_cli import common_options, parse_weights, rank_options, report
from loraport.commands.merge import check_weights


def register(group: click.Group) -> None:
    group.add_command(combine_cmd)


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--weight", "weight", multiple=True, type=float, help="weight of the adapter at the same position "
              "(repeatable: one per adapter, or none for 1.0 each), as in merge")
@click.option("--weights", default=None, help="the same as one comma-separated list, e.g. 0.7,0.3")
@click.option("--method", default="svd", show_default=True, type=click.Choice(["cat", "svd", "ties", "dare"]),
              help="cat: exact, ranks add; svd: exact sum re-factorized; ties/dare: per their papers")
@rank_options
@click.option("--density", type=float, default=None,
              help="ties: fraction of entries kept per task (default 0.2); dare: keep probability (default 0.5)")
@click.option("--seed", default=None, type=int, help="dare: seed of the drop masks  [default: 0]")
@click.option("--out", required=True, type=click.Path(), help="the adapter to write")
@click.option("--to", "to", default=None, help="output format (default: the first input's when writable, else peft)")
@click.option("--format", "fmt", default=None, help="force the input format (default: detect)")
@click.option("--base", default=None, type=click.Path(), help="base model, for formats whose keys need it (kohya)")
@common_options
def combine_cmd(adapters, weight, weights, method, rank, energy, max_rank, density, seed, out, to, fmt, base, dtype,
                device, overwrite, as_json):
    """One adapter approximating Σ wᵢ·ΔWᵢ. Without --rank/--energy, svd/ties/dare keep the largest rank of any
    input (PEFT's default). Every layer reports its relative error against the exact weighted sum."""
    from loraport.errors import BadInputError
    from loraport.lowrank import combine

    if weight and weights is not None:
        raise BadInputError("give the weights either as repeated --weight or as one --weights list, not both")
    ws = list(weight) or parse_weights(weights, len(adapters))
    check_weights(ws, len(adapters), "--weights" if weights is not None else "--weight")
    if density is not None and method not in ("ties", "dare"):
        raise BadInputError(f"--density applies to --method ties or dare, not {method}")
    if seed is not None and method != "dare":
        raise BadInputError(f"--seed draws dare's drop masks; --method {method} has none")
    rep = combine(list(adapters), out, weights=ws or None, method=method, rank=rank,
                  energy=energy, max_rank=max_rank, density=density, seed=seed or 0, to=to, fmt=fmt, base=base,
                  dtype=dtype, device=device, overwrite=overwrite)
    report(rep, as_json, f"combined LoRA ({method})")
