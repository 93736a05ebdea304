"""What `inspect` reports: an adapter's format, ranks, alphas, scale rule, targets, DoRA, size and full-rank
cost; or the provenance a loraport-merged output records. The CLI (loraport/commands/inspect.py) prints it."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from loraport.errors import BadInputError


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
    loras = [d for d in adapter.deltas if d.has_lora_factors]
    ranks = Counter(d.rank() for d in loras)
    alphas = Counter(d.alpha for d in loras if d.alpha is not None)
    rules = Counter(d.scale_rule for d in loras)
    scales = Counter(round(d.scale, 6) for d in loras)
    leaf = Counter(_module_kind(t) for t in {d.target for d in adapter.deltas})
    params = adapter.num_params()
    full = 0
    for d in adapter.deltas:
        shp = d.implied_shape()
        if shp is not None and d.factored:
            full += math.prod(shp)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for d in adapter.deltas for t in d.stored_tensors())
    size = sum(Path(f).stat().st_size for f in adapter.files if Path(f).is_file())
    factor_params = sum(d.num_params() for d in adapter.deltas if d.factored)
    return {
        "path": adapter.path, "format": adapter.format, "kinds": adapter.kinds(),
        "ranks": dict(sorted(ranks.items())), "alphas": {str(k): v for k, v in alphas.items()},
        "scale_rules": dict(rules), "scales": {str(k): v for k, v in scales.items()},
        "targets": len({d.target for d in adapter.deltas}), "target_modules": dict(sorted(leaf.items())),
        "dora": any(d.has_magnitude for d in adapter.deltas),
        "trainable_params": params, "full_rank_params": full,
        "compression": round(full / factor_params, 1) if factor_params else None,
        "family": adapter.family,
        "dtypes": dict(dtypes), "file_bytes": size, "files": adapter.files, "notes": adapter.notes,
        "deltas": [d.describe() for d in adapter.deltas],
    }


def base_storage(ckpt) -> dict:
    """How a base stores its tensors — dtype, or quantized layout, per tensor family (layer numbers folded to
    `*`) — and what a merge into it writes by default."""
    import re

    families: dict[str, Counter] = {}
    for n in ckpt.names():
        fam = re.sub(r"\.\d+\.", ".*.", n)
        families.setdefault(fam, Counter())[ckpt.storage_of(n)] += 1
    fams = {f: (next(iter(c)) if len(c) == 1 else dict(c)) for f, c in families.items()}
    own = ckpt.own_layout()
    writes = ("the same layout: updated weights re-quantized by the base's scale rule, the rest copied "
              "(--dtype bf16/fp16/fp32 writes unquantized weights instead)") if own is not None else (
        "dequantized 16-bit weights (--quantize re-quantizes)" if ckpt.config_rewritten else "the base's dtypes")
    return {"path": str(ckpt.root), "layout": ckpt.kind, "tensors": len(ckpt.names()),
            "storage": dict(Counter(ckpt.storage_of(n) for n in ckpt.names())), "families": fams,
            "merge_writes": writes}


def _gguf_base(p: Path) -> dict:
    from loraport import gguf_inspect
    from loraport.engine.gguf_source import GgufBase

    src = GgufBase.open(p)
    try:
        rep = {"path": str(p), "kind": "gguf-base", "base": gguf_inspect.storage(src)}
        prov = {k: v for k, v in src.file.metadata.items() if k.startswith("loraport.")}
        if prov:  # a loraport-merged GGUF: what it records about its inputs, as for safetensors outputs
            try:
                prov["loraport.adapters"] = json.loads(prov.get("loraport.adapters", "[]"))
            except (json.JSONDecodeError, TypeError):
                pass
            rep["provenance"] = prov
        return rep
    finally:
        src.close()


def inspect_path(path: str | Path, format: str | None = None, base: str | Path | None = None,
                 plot: str | Path | None = None) -> dict:
    """The inspect report of `path`: a GGUF model's storage (kind "gguf-base"), a merged output's provenance,
    else the adapter's description (with its singular-value spectra, and a PNG of them written to `plot`, when
    asked; with a GGUF `base`, what the merge writes)."""
    from loraport.formats import detect, load_adapter

    p = Path(path)
    if not p.exists():
        raise BadInputError(f"not found: {p}")
    from loraport import gguf_inspect

    if gguf_inspect.is_gguf_model(p):  # a GGUF model: its storage and what a merge into it writes
        return _gguf_base(p)
    prov = _provenance(p)
    if prov is not None:
        return {"path": str(p), "kind": "merged-output", "provenance": prov}
    ckpt = None
    if base and Path(base).suffix == ".gguf":
        from loraport.engine.gguf_source import GgufBase

        ckpt = GgufBase.open(base)
    elif base:
        from loraport.engine.sources import open_base

        ckpt = open_base(Path(base))
    try:
        fmt_cls = detect(p) if not format else None
        adapter = load_adapter(p, format=format or fmt_cls.name, base=ckpt)
        rep = describe(adapter)
        rep["format_title"] = (fmt_cls.title if fmt_cls else format)
        if ckpt is not None and ckpt.kind == "gguf-file":
            rep["base"] = {**gguf_inspect.storage(ckpt), "merge": gguf_inspect.merge_preview(ckpt, adapter)}
        elif ckpt is not None:
            rep["base"] = base_storage(ckpt)
        if plot:
            from loraport.spectrum import plot_spectrum, spectrum_report

            spec = spectrum_report(adapter, base=ckpt)
            plot_spectrum(spec, plot)
            rep["spectrum"] = spec
            rep["plot"] = str(plot)
    finally:
        if ckpt is not None:
            ckpt.close()
    return rep
