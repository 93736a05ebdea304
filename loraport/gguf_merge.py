"""`merge` into a GGUF base: the same plan and per-tensor math as loraport/merging.py, with the GGUF source
(loraport/engine/gguf_source.py: names, one tensor at a time dequantized) and the GGUF sink
(loraport/engine/gguf_sink.py). Every tensor keeps its ggml type and the metadata is carried over; a tensor no
adapter touches is copied byte for byte, an updated one is re-quantized to its own type (codes equal
`gguf.quants.quantize` of the merged fp32 weights) and reported with how much of its delta survived.
One tensor is held at a time: peak memory is the largest tensor a few times over, never the model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from loraport.engine.apply import merged_tensor
from loraport.engine.device import pick_device
from loraport.engine.gguf_sink import GgufEntry, GgufSink
from loraport.engine.gguf_source import GgufBase
from loraport.engine.sinks import provenance
from loraport.errors import BadInputError
from loraport.finite import check_merged
from loraport.outputs import check_free_space, check_output, staged_output
from loraport.quant.metrics import ERASED_BELOW, delta_retained, delta_survival, finite, rel_error


def merge_gguf(base: str | Path, adapters, out: str | Path, *, dtype: str = "auto", device: str = "auto",
               shard_size=None, quantize=None, quant_options=None, fp16_base=None, reference=None,
               adapter_format: str | None = None, overwrite: bool = False, strict: bool = True,
               manifest: bool = True, hash_cache=True, nonfinite: str = "warn", progress=None,
               allow_incomplete: bool = False, force: bool = False, tie_embeddings: str = "auto",
               transformer: str = "transformer") -> dict:
    """Merge adapters into the GGUF file `base`, writing the GGUF file `out`. Returns the report dict.
    `force` as in merge (an adapter whose merged form behaves differently); `tie_embeddings` as in merge (a GGUF
    without output.weight ties its head: untying would add a tensor llama.cpp's file did not have, so only
    "auto" and "keep" are accepted)."""
    from loraport import manifest as mf
    from loraport.merging import _adapter_rows, _load_adapters, _plan

    t0 = time.perf_counter()
    adapters = [(a, 1.0) if isinstance(a, (str, Path)) else (a[0], float(a[1])) for a in adapters]
    if not adapters:
        raise BadInputError("no --adapter given")
    refused = {"--dtype": dtype != "auto", "--shard-size": shard_size, "--quantize": quantize or quant_options,
               "--fp16-base": fp16_base, "--reference": reference, "--tie-embeddings untie": tie_embeddings == "untie",
               "--transformer": transformer != "transformer"}
    if any(refused.values()):  # a GGUF base is written back in its own types, as one file: refused, never ignored
        raise BadInputError(f"{', '.join(k for k, v in refused.items() if v)} do(es) not apply to a .gguf --base "
                            "(each tensor keeps its own ggml type; re-quantize with llama-quantize)")
    out_p = check_output(out, [base, *[a for a, _ in adapters]], overwrite)
    if out_p.suffix != ".gguf":
        raise BadInputError(f"--out {out}: a GGUF base is written as a .gguf file")
    dev = pick_device(device)
    src = GgufBase.open(base)
    try:
        cache = mf.HashCache.of(hash_cache)
        hashes = mf.BackgroundHashes([base, *[a for a, _ in adapters]], cache) if manifest else None
        loaded, warns = _load_adapters(adapters, src, adapter_format, strict, nonfinite, cache, force)
        plan = _plan(src, loaded, strict, "keep" if tie_embeddings == "auto" else tie_embeddings)
        entries, fell_back = _entries(src, plan)
        warns += fell_back
        check_free_space(out_p.parent, src.file.size + sum(e.nbytes for e in entries))
        f = src.file
        meta = [(k, *f.value_types[k], v) for k, v in f.metadata.items() if not k.startswith("loraport.")]
        meta += [(k, 8, None, str(v)) for k, v in provenance(loaded, "auto", None, cache.sha256).items()]
        align = int(f.metadata.get("general.alignment", 32))
        rows: list[dict] = []
        with staged_output(out_p, is_dir=False, overwrite=overwrite) as stage:
            sink = GgufSink(stage, meta, entries, align)
            try:
                written = _stream(src, plan, sink, dev, nonfinite, rows, warns, progress)
                sink.close()
            except BaseException:
                sink.abort()
                raise
            if hashes is not None:
                summary = {"base": str(base), "dtype": "auto", "quantize": None, "strict": strict,
                           "adapters": _adapter_rows(loaded), "tensors": len(entries),
                           "tensors_updated": len(plan.updates), "skipped_targets": len(plan.skipped)}
                man = mf.build(stage, inputs=hashes.result(), plan=summary, name=out_p.name)
        if hashes is not None:
            mf.write_sibling(out_p, man)
    finally:
        src.close()
    report = {
        "base": str(base), "out": str(out_p), "device": str(dev), "dtype": "auto", "quantize": None,
        "adapters": _adapter_rows(loaded), "tensors": len(entries), "tensors_updated": len(plan.updates),
        "skipped_targets": plan.skipped, "files": [out_p.name], "bytes_written": written,
        "seconds": round(time.perf_counter() - t0, 3), "quantization": _total(rows), "warnings": warns,
    }
    report["warnings"] += [r["warning"] for r in report["quantization"] if r.get("warning")]
    if hashes is not None:
        report["manifest"] = str(mf.manifest_path(out_p))
    return report


def _entries(src: GgufBase, plan) -> tuple[list[GgufEntry], list[str]]:
    """The output's tensor table (each tensor's type: its own; an updated IQ* / TQ* / MXFP4 tensor's fallback)
    and a warning per kind of fallback."""
    entries, moved = [], {}
    for name, g in src.gguf_of.items():
        t = src.file.tensors[g]
        stored = src.ggml_type(name)
        out = src.out_type(name) if name in plan.updates else stored
        if out is not stored:
            moved.setdefault((stored.name, out.name), []).append(name)
        n = math.prod(t.shape) // out.block * out.nbytes
        entries.append(GgufEntry(g, t.shape, out.id, n))
    warns = [f"{len(names)} updated {a} tensor(s) written as {b} (loraport has no {a} quantizer; {b} has at least "
             f"as many bits per weight), e.g. {names[0]}" for (a, b), names in moved.items()]
    return entries, warns


def _stream(src: GgufBase, plan, sink: GgufSink, dev, nonfinite: str, rows: list, warns: list, progress) -> int:
    """Read ► apply ► re-quantize ► write, one tensor at a time in the file's order."""
    import contextlib

    ctx = progress(src.file.size) if progress is not None else contextlib.nullcontext(None)
    written = 0
    with ctx as advance:
        for name, g in src.gguf_of.items():
            if name not in plan.updates:
                n = sink.write(g, src.raw(name))
            else:
                W0 = src.get(name)
                W = merged_tensor(plan, name, dev, base_tensor=W0, copy=True).cpu()
                msg = check_merged(name, W0, [W], nonfinite)
                if msg:
                    warns.append(msg)
                codes = src.to_stored(name, W)
                rows.append(_row(src, name, W0, W, codes, src.raw(name)))
                n = sink.write(g, codes)
            written += n
            if advance is not None:
                advance(n)
    return written


def _row(src: GgufBase, name: str, W0: torch.Tensor, W: torch.Tensor, codes: torch.Tensor,
         stored: torch.Tensor) -> dict:
    """How the re-quantized tensor relates to the merged weights and to the base (loraport.quant.metrics)."""
    t = src.out_type(name)
    deq = src.from_stored(name, codes, t)
    delta = W - W0
    rel, snr = rel_error(W, deq)
    kept, surv = delta_retained(deq, W0, delta), delta_survival(deq, W0, delta)
    row = {"name": name, "type": t.name, "rel_error": finite(rel), "snr_db": finite(snr),
           "delta_survival": None if surv is None else finite(surv),
           "delta_retained": None if kept is None else finite(kept),
           "bytes_before": stored.numel(), "bytes_after": codes.numel()}
    if t is src.ggml_type(name):
        row["codes_changed"] = round(float((codes != stored).float().mean()), 6)  # of the stored bytes
    if kept is not None and kept < ERASED_BELOW:
        row["erased"] = True
    return row


def _total(rows: list[dict]) -> list[dict]:
    kept = [r["delta_retained"] for r in rows if r.get("delta_retained") is not None]
    if not kept:
        return rows
    erased = sum(1 for k in kept if k < ERASED_BELOW)
    errs = [r["rel_error"] for r in rows if r.get("rel_error") is not None]
    total = {"name": "(total)", "tensors": len(rows), "updated_tensors": len(kept),
             "bytes_before": sum(r["bytes_before"] for r in rows), "bytes_after": sum(r["bytes_after"] for r in rows),
             "rel_error_mean": round(sum(errs) / len(errs), 6) if errs else None,
             "delta_retained_median": sorted(kept)[len(kept) // 2], "erased_tensors": erased}
    if erased * 2 > len(kept):
        total["warning"] = (f"re-quantizing erased most of the adapter: {erased}/{len(kept)} updated tensors keep "
                            f"less than {ERASED_BELOW:.0%} of their delta; merge into the F16/BF16 GGUF and "
                            "quantize the result with llama-quantize instead")
    return rows + [total]
