"""Options and output shared by `extract`, `resize` and `combine` (not a command: the leading underscore
keeps the CLI's discovery away from it)."""

from __future__ import annotations

import click

from loraport.console import emit_json, err

SVD_HELP = "auto: randomized SVD for big matrices, full SVD otherwise"


def rank_options(f):
    """--rank / --energy / --max-rank (exactly one of the first two, checked by the API)."""
    f = click.option("--max-rank", type=int, default=None,
                     help="with --energy (or combine's default rank): never keep more than this")(f)
    f = click.option("--energy", type=float, default=None,
                     help="keep per layer the fewest directions retaining this fraction of Σσ² (e.g. 0.95)")(f)
    f = click.option("--rank", type=int, default=None, help="keep this many singular directions per layer")(f)
    return f


def common_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="print a machine-readable report on stdout")(f)
    f = click.option("--overwrite", is_flag=True, help="replace an existing --out")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")(f)
    f = click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
                     help="dtype of the written factors (auto = the inputs')")(f)
    return f


def parse_weights(s: str | None, n: int) -> list[float] | None:
    from loraport.errors import BadInputError

    if s is None:
        return None
    try:
        ws = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"--weights {s!r}: give comma-separated numbers, e.g. 0.7,0.3") from None
    return ws


def report(rep: dict, as_json: bool, title: str, rank_key: str = "rank") -> None:
    """The per-layer table (stderr) or the whole report as JSON (stdout)."""
    if as_json:
        emit_json(rep)
        return
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    t.add_column("layer", overflow="fold")
    t.add_column("rank", justify="right")
    t.add_column("rel. error", justify="right")
    for x in rep["layers"]:
        r = x.get(rank_key, x.get("rank_out"))
        if "rank_in" in x:
            rin = x["rank_in"]
            r = f"{'+'.join(map(str, rin)) if isinstance(rin, list) else rin} → {x['rank_out']}"
        t.add_row(x["target"], str(r), f"{x['rel_error']:.3e}")
    err.print(t)
    if "density" in rep:
        seed = f", seed {rep['seed']} (masks per layer from crc32(seed:adapter:layer))" if "seed" in rep else ""
        err.print(f"{rep['method']}: density {rep['density']}{seed}; errors are against the exact weighted sum")
    err.print(f"{rep['num_layers']} layer(s), max rel. error {rep['max_rel_error']:.3e}, "
              f"mean {rep['mean_rel_error']:.3e} → {rep['out']} ({rep['format']})")
