"""`loraport inspect`: what an adapter (or a loraport-merged output) is and what it costs."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import click

from loraport.console import emit_json, human_bytes, out


def register(group: click.Group) -> None:
    group.add_command(inspect_cmd)


def _provenance(path: Path) -> dict | None:
    """loraport.* metadata of a merged output (folder or .safetensors), or None."""
    from loraport.errors import LoraportError
    from loraport.safetensors_io import SafetensorsFile

    files = [path] if path.is_file() and path.suffix == ".safetensors" else sorted(path.glob("*.safetensors"))
    for f in files[:1]:
        try:
            meta = SafetensorsFile(f).metadata
        except LoraportError:
            return None
        if "loraport.version" in meta:
            d = dict(meta)
            try:
                d["loraport.adapters"] = json.loads(d.get("loraport.adapters", "[]"))
            except json.JSONDecodeError:
                pass
            return d
    return None


_KOHYA_PART = re.compile(r"^lora_(unet|te\d*)_")


def _module_kind(target: str) -> str:
    """What a target is, without its layer numbers: the last module name of a dotted name (q_proj), or for an
    underscore-joined kohya name (no base given) its component and the part after the last block index
    (`unet attn1_to_k`, `te1 mlp_fc1`)."""
    name = target.removesuffix(".weight")
    if "." in name:
        return name.rsplit(".", 1)[-1]
    m = _KOHYA_PART.match(name)
    tail = re.split(r"_\d+_", name)[-1] if re.search(r"_\d+_", name) else name[m.end():] if m else name
    return f"{m.group(1)} {tail}" if m else tail


def describe(adapter) -> dict:
    """The inspect report of a loaded adapter."""
    loras = [d for d in adapter.deltas if d.kind == "lora"]
    ranks = Counter(int(d.A.shape[0]) for d in loras)
    alphas = Counter(d.alpha for d in loras if d.alpha is not None)
    rules = Counter(d.scale_rule for d in loras)
    scales = Counter(round(d.scale, 6) for d in loras)
    leaf = Counter(_module_kind(t) for t in {d.target for d in adapter.deltas})
    params = adapter.num_params()
    full = 0
    for d in adapter.deltas:
        shp = d.implied_shape()
        if shp is not None and d.kind in ("lora", "loha", "lokr"):
            full += math.prod(shp)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for d in adapter.deltas
                     for t in (getattr(d, "A", None), getattr(d, "B", None), getattr(d, "value", None),
                               getattr(d, "diff", None)) if t is not None)
    size = sum(Path(f).stat().st_size for f in adapter.files if Path(f).is_file())
    factor_params = sum(d.num_params() for d in adapter.deltas if d.kind in ("lora", "loha", "lokr"))
    return {
        "path": adapter.path, "format": adapter.format, "kinds": adapter.kinds(),
        "ranks": dict(sorted(ranks.items())), "alphas": {str(k): v for k, v in alphas.items()},
        "scale_rules": dict(rules), "scales": {str(k): v for k, v in scales.items()},
        "targets": len({d.target for d in adapter.deltas}), "target_modules": dict(sorted(leaf.items())),
        "dora": any(getattr(d, "magnitude", None) is not None for d in adapter.deltas),
        "trainable_params": params, "full_rank_params": full,
        "compression": round(full / factor_params, 1) if factor_params else None,
        "dtypes": dict(dtypes), "file_bytes": size, "files": adapter.files, "notes": adapter.notes,
        "deltas": [d.describe() for d in adapter.deltas],
    }


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--format", "fmt", default=None, help="force the adapter format (default: detect)")
@click.option("--base", default=None, type=click.Path(), help="a base model, for formats named against it and "
              "for --plot's ‖s·ΔW‖/‖W‖")
@click.option("--plot", default=None, type=click.Path(), help="write a PNG of per-layer singular-value spectra")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect_cmd(path, fmt, base, plot, as_json):
    """Show an adapter's format, ranks, alphas, scale rule, targets, DoRA, size and full-rank cost;
    or the provenance recorded in a loraport-merged output."""
    from loraport.errors import BadInputError
    from loraport.formats import detect, load_adapter

    p = Path(path)
    if not p.exists():
        raise BadInputError(f"not found: {p}")
    prov = _provenance(p)
    if prov is not None:
        if as_json:
            emit_json({"path": str(p), "kind": "merged-output", "provenance": prov})
            return
        out.print(f"[bold]{p}[/bold]: merged by loraport {prov.get('loraport.version')}")
        for a in prov.get("loraport.adapters", []):
            files = ", ".join(f"{k} sha256:{v}" for k, v in a.get("files", {}).items())
            out.print(f"  adapter {a.get('path')} ({a.get('format')}, weight {a.get('weight')}, "
                      f"{'/'.join(a.get('scale_rules', []))}) {files}")
        out.print(f"  dtype {prov.get('loraport.dtype')}, quantize {prov.get('loraport.quantize')}")
        return
    ckpt = None
    if base:
        from loraport.merging import open_base

        ckpt = open_base(Path(base))
    fmt_cls = detect(p) if not fmt else None
    adapter = load_adapter(p, format=fmt or fmt_cls.name, base=ckpt)
    rep = describe(adapter)
    rep["format_title"] = (fmt_cls.title if fmt_cls else fmt)
    if plot:
        from loraport.spectrum import plot_spectrum, spectrum_report

        spec = spectrum_report(adapter, base=ckpt)
        plot_spectrum(spec, plot)
        rep["spectrum"] = spec
        rep["plot"] = str(plot)
    if as_json:
        emit_json(rep)
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
    if plot:
        out.print(f"  plot          {plot}")
