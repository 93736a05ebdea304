"""`loraport validate ARTIFACT --base ... --adapter ...`: parity gate for CI (loraport/parity.py)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    group.add_command(validate_cmd)


@click.command("validate")
@click.argument("artifact", type=click.Path())
@click.option("--base", default=None, type=click.Path(), help="the base model folder the artifact was made from "
              "(default: the one the artifact's manifest records)")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(), help="adapter (repeatable; default: the "
              "manifest's)")
@click.option("--weight", "weights", multiple=True, type=float, help="weight per --adapter (repeatable: one per "
              "--adapter, or none for 1.0 each)")
@click.option("--tolerance", default="auto", show_default=True, help="auto (from dtype/quantization) or a max |Δ|")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="onnxruntime execution provider")
@click.option("--active", default="all", show_default=True,
              help="multi-LoRA graphs: which .onnx_adapter to check (a name, none, or all)")
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--seq", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON on stdout")
def validate_cmd(artifact, base, adapters, weights, tolerance, provider, active, batch, seq, seed, as_json):
    """Run ARTIFACT and the fp32 reference (base + unmerged adapters) on the same inputs; exit 0 when within
    tolerance, 1 when not, 2 on bad input."""
    import loraport
    from loraport.console import emit_json, err, progress
    from loraport.errors import BadInputError

    from loraport.commands.merge import check_weights

    check_weights(weights, len(adapters))  # the same rule and words as merge and combine
    if batch < 1 or seq < 1:
        raise BadInputError("--batch and --seq must be positive")
    ads = [(a, weights[i] if weights else 1.0) for i, a in enumerate(adapters)]
    with progress("validate", None):  # loads both models and runs them: CI logs see it alive
        res = loraport.validate(artifact, base, ads, tolerance=tolerance, provider=provider, active=active,
                                batch=batch, seq=seq, seed=seed)
    rep = res.to_dict()
    if as_json:
        emit_json(rep)
    else:
        _print(rep, err)
    res.raise_if_failed()


def _print(rep: dict, console) -> None:
    from rich.table import Table

    console.print(f"artifact {rep['artifact']} ({rep['kind']}, {rep['precision']})")
    req = rep.get("providers_requested")
    console.print(f"providers: {', '.join(rep.get('providers', []))}"
                  + (f"  (requested {', '.join(req)})" if req else ""))
    if "qdq_matmulnbits_accuracy_level" in rep:
        console.print(f"session.qdq_matmulnbits_accuracy_level = {rep['qdq_matmulnbits_accuracy_level']}")
    console.print(f"tolerance ({rep['tolerance']['mode']}): {rep['tolerance']['why']}")
    t = Table("case", "output", "max |Δ|", "mean |Δ|", "cosine", "top-1", "result")
    for c in rep["cases"]:
        for out, m in c["outputs"].items():
            t.add_row(c["case"], out, f"{m['max_abs']:.3g}", f"{m['mean_abs']:.3g}", f"{m['cosine']:.6f}",
                      f"{m['top1_agreement']:.3f}", "pass" if c["passed"] else "FAIL")
    console.print(t)
    for n in rep.get("notes", []):
        console.print(f"note: {n}")
    console.print("PASS" if rep["passed"] else "FAIL")
