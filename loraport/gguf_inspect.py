"""What `inspect` reports about a GGUF model used as a base (loraport.engine.gguf_source): its storage per
tensor family — ggml types, tensor count, bytes, layer numbers folded to `*` — and what a merge into it writes:
every tensor in its own type, an updated k-quant in its fallback type (loraport.quant.ggml.FALLBACK); with an
adapter, the planned merge itself (which tensors are re-quantized to which type, how many are copied)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from loraport.quant import ggml


def is_gguf_model(path: Path) -> bool:
    """A .gguf file that is not a LoRA adapter (general.type "adapter"). A file the model reader refuses is
    left to the adapter reader, whose message names what is wrong with it as an adapter."""
    from loraport.engine.gguf_source import GgufBaseFile
    from loraport.errors import LoraportError

    if path.suffix != ".gguf" or not path.is_file():
        return False
    try:
        f = GgufBaseFile(path)
    except LoraportError:
        return False
    try:
        return f.metadata.get("general.type") != "adapter"
    finally:
        f.close()


def _family(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _types(c: Counter) -> str:
    return ", ".join(f"{t} ×{n}" for t, n in c.most_common())


def storage(src) -> dict:
    """The storage report of an open GgufBase `src` (served names: HF names for the LLM architectures)."""
    fams: dict[str, dict] = {}
    by_type: Counter = Counter()
    nbytes: Counter = Counter()
    for name, g in src.gguf_of.items():
        t, b = src.ggml_type(name).name, src.file.tensors[g].end - src.file.tensors[g].begin
        by_type[t] += 1
        nbytes[t] += b
        fam = fams.setdefault(_family(name), {"types": Counter(), "count": 0, "bytes": 0})
        fam["types"][t] += 1
        fam["count"] += 1
        fam["bytes"] += b
    for fam in fams.values():
        fam["types"] = dict(fam["types"])
    moved = {t: ggml.writable(ggml.BY_NAME[t]).name for t in by_type if ggml.writable(ggml.BY_NAME[t]).name != t}
    writes = "one .gguf: every tensor in its own ggml type, metadata carried over; tensors no adapter updates " \
             "copied byte for byte"
    if moved:
        writes += "; updated " + ", ".join(f"{a} tensors as {b}" for a, b in moved.items()) + \
                  " (loraport has no quantizer for them; llama.cpp loads mixed types)"
    meta = src.file.metadata
    return {"path": str(src.path), "layout": "gguf-file", "architecture": src.arch or None,
            "merged_by": meta.get("loraport.version"), "tensors": len(src.gguf_of), "storage": dict(by_type),
            "bytes": dict(nbytes), "families": fams, "merge_writes": writes, "fallbacks": moved}


def merge_preview(src, adapter) -> dict:
    """What merging `adapter` into `src` writes: per updated tensor type, the type written, and what is copied."""
    from loraport.merging import _plan

    plan = _plan(src, [(adapter, 1.0)], strict=False, tie="keep")
    written: Counter = Counter()
    for name in plan.updates:
        a, b = src.ggml_type(name).name, src.out_type(name).name
        written[a if a == b else f"{a} -> {b}"] += 1
    return {"updated": len(plan.updates), "copied": len(src.gguf_of) - len(plan.updates),
            "written": dict(written), "skipped_targets": len(plan.skipped)}


def lines(rep: dict) -> list[str]:
    """The human-readable form of `storage` (+ `merge_preview` under "merge") for the CLI."""
    from loraport.console import human_bytes

    out = [f"  GGUF base     {rep['path']} ({rep['architecture'] or 'no general.architecture'}, "
           f"{rep['tensors']} tensors): " + _types(Counter(rep["storage"]))
           + (f"; merged by loraport {rep['merged_by']}" if rep.get("merged_by") else "")]
    for fam, f in list(rep["families"].items())[:32]:
        types = next(iter(f["types"])) if len(f["types"]) == 1 else _types(Counter(f["types"]))
        out.append(f"    {fam:52s} {types:20s} {f['count']:>4} tensor(s) {human_bytes(f['bytes']):>10}")
    if len(rep["families"]) > 32:
        out.append(f"    … {len(rep['families']) - 32} more families (--json lists all)")
    out.append(f"  merge writes  {rep['merge_writes']}")
    if rep.get("merge"):
        m = rep["merge"]
        out.append(f"  this merge    {m['updated']} tensor(s) re-quantized ({_types(Counter(m['written']))}), "
                   f"{m['copied']} copied" + (f", {m['skipped_targets']} target(s) unmatched"
                                              if m["skipped_targets"] else ""))
    return out
