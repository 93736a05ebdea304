"""`loraport inspect`: what an adapter (or a loraport-merged output) is and what it costs (the report:
loraport/inspection.py)."""

from __future__ import annotations

import click

from loraport.console import emit_json, human_bytes, out


def register(group: click.Group) -> None:
    group.add_command(inspect_cmd)


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", default=None, help="force the adapter format (default: detect)")
@click.option("--base", default=None, type=click.Path(), help="a base model, for formats named against it and "
              "for --plot's ‖s·ΔW‖/‖W‖")
@click.option("--plot", default=None, type=click.Path(), help="write a PNG of per-layer singular-value spectra")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect_cmd(path, fmt, base, plot, as_json):
    """Show an adapter's format, ranks, alphas, scale rule, targets, DoRA, size and full-rank cost;
    or the provenance recorded in a loraport-merged output; or a GGUF model's storage per tensor family."""
    import loraport

    res = loraport.inspect(path, format=fmt, base=base, plot=plot)
    rep = res.to_dict()
    if as_json:
        emit_json(rep)
        return
    p = res.path
    if res.kind == "gguf-base":
        from loraport.gguf_inspect import lines

        out.print(f"[bold]{p}[/bold]: a GGUF model (a base: `loraport merge --base {p}`)", markup=True)
        for line in lines(rep["base"]):
            out.print(line, markup=False)
        for a in (res.provenance or {}).get("loraport.adapters", []):
            if isinstance(a, dict):
                out.print(f"  adapter       {a.get('path')} ({a.get('format')}, weight {a.get('weight')})",
                          markup=False)
        return
    if res.kind == "merged-output":
        prov = res.provenance
        out.print(f"[bold]{p}[/bold]: merged by loraport {prov.get('loraport.version')}")
        for a in prov.get("loraport.adapters", []):
            files = ", ".join(f"{k} sha256:{v}" for k, v in a.get("files", {}).items())
            out.print(f"  adapter {a.get('path')} ({a.get('format')}, weight {a.get('weight')}, "
                      f"{'/'.join(a.get('scale_rules', []))}) {files}")
        out.print(f"  dtype {prov.get('loraport.dtype')}, quantize {prov.get('loraport.quantize')}")
        return
    out.print(f"[bold]{p}[/bold]")
    out.print(f"  format        {rep['format']} — {rep['format_title']}")
    out.print(f"  kinds         {', '.join(rep['kinds'])}{'  (DoRA)' if rep['dora'] else ''}")
    out.print(f"  rank(s)       {', '.join(f'{r} ×{n}' for r, n in rep['ranks'].items()) or '-'}")
    out.print(f"  alpha(s)      {', '.join(f'{a} ×{n}' for a, n in rep['alphas'].items()) or '-'}")
    out.print(f"  scale rule    {', '.join(f'{r} ×{n}' for r, n in rep['scale_rules'].items()) or '-'}; "
              f"scale(s) {', '.join(rep['scales']) or '-'}")
    out.print(f"  targets       {rep['targets']}: " + ", ".join(f"{m} ×{n}" for m, n in rep["target_modules"].items()))
    out.print(f"  DoRA          {'yes' if rep['dora'] else 'no'}")
    out.print(f"  parameters    {rep['trainable_params']} trainable")
    if rep["compression"]:
        out.print(f"  full-rank     the same layers at full rank: {rep['full_rank_params']} numbers "
                  f"({rep['compression']:g}× more)")
    out.print(f"  dtype         {', '.join(rep['dtypes'])}; files {human_bytes(rep['file_bytes'])} "
              f"({rep['file_bytes']} bytes)")
    for n in rep["notes"]:
        out.print(f"  note          {n}")
    if rep.get("base", {}).get("layout") == "gguf-file":
        from loraport.gguf_inspect import lines

        for line in lines(rep["base"]):
            out.print(line, markup=False)
    elif rep.get("base"):
        b = rep["base"]
        out.print(f"  base          {b['path']} ({b['layout']}, {b['tensors']} tensors): "
                  + ", ".join(f"{k} ×{n}" for k, n in b["storage"].items()))
        for fam, how in list(b["families"].items())[:24]:
            out.print(f"    {fam:52s} {how}")
        out.print(f"  merge writes  {b['merge_writes']}")
    if plot:
        out.print(f"  plot          {plot}")
