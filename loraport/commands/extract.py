"""`loraport extract`: a LoRA adapter from the difference between a fine-tuned model and its base."""

from __future__ import annotations

import click

from loraport.commands._choices import FormatChoice
from loraport.commands._lowrank_cli import SVD_HELP, common_options, rank_options, report


def register(group: click.Group) -> None:
    group.add_command(extract_cmd)


@click.command("extract")
@click.option("--base", required=True, type=click.Path(), help="the base model (HF folder or .safetensors)")
@click.option("--tuned", required=True, type=click.Path(), help="the fine-tuned model, same layout")
@rank_options
@click.option("--out", required=True, type=click.Path(), help="the adapter to write")
@click.option("--to", "to", default="peft", show_default=True, type=FormatChoice(lambda f: f.extract_to),
              help="adapter format to write")
@click.option("--svd", "svd", default="auto", show_default=True, type=click.Choice(["auto", "full", "randomized"]),
              help=SVD_HELP)
@click.option("--seed", default=None, type=int, help="seed of the randomized SVD's sketch  [default: 0]")
@click.option("--include", default=None, help="only tensors whose name matches this regex")
@click.option("--exclude", default=None, help="skip tensors whose name matches this regex")
@common_options
def extract_cmd(base, tuned, rank, energy, max_rank, out, to, svd, seed, include, exclude, dtype, device,
                overwrite, as_json):
    """ΔW = W_tuned − W_base per matching matrix / conv kernel, factored by a truncated SVD at a fixed
    --rank or the rank that keeps --energy; streams one tensor pair at a time. Reports each layer's
    relative error ‖ΔW − BA‖/‖ΔW‖."""
    from loraport.checkpoint import Checkpoint
    from loraport.console import err, progress
    from loraport.errors import BadInputError
    from loraport.lowrank import extract

    if seed is not None and svd == "full":
        raise BadInputError("--seed seeds the randomized SVD; --svd full uses none")
    seed = seed or 0
    total = _numel(Checkpoint.open(tuned)) if err.is_terminal and not as_json else None
    with progress("extracting", total, enabled=not as_json) as advance:
        rep = extract(base, tuned, out, rank=rank, energy=energy, max_rank=max_rank, to=to, method=svd, seed=seed,
                      dtype=dtype, device=device, include=include, exclude=exclude, overwrite=overwrite,
                      on_layer=lambda name, n: advance(n))
    report(rep, as_json, "extracted LoRA")


def _numel(ck) -> int:
    n = 0
    for name in ck.names():
        k = 1
        for s in ck.info(name).shape:
            k *= s
        n += k
    ck.close()
    return n
