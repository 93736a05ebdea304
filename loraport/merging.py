"""`merge`: adapters + base → merged model. The entry point of the engine in loraport/engine/:

    sources (open the base) → plan (targets resolved, fails before a byte is written) → layout (the output
    files, headers known up front) → stream (read ► apply ► write, bounded buffers, device) → sinks

This module reads the adapters, picks the device and the output options, runs the engine inside a staged
output (renamed into place when complete) and writes the manifest. An .onnx base is baked by loraport.onnx instead:
`loraport.api.run_merge` chooses, so this engine imports nothing of loraport.onnx (which is built on it).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from loraport.adapter import Adapter
from loraport.checkpoint import Checkpoint
from loraport.engine.apply import FUSE_MIN, merged_tensor
from loraport.engine.device import pick_device, warm_cuda
from loraport.engine.layout import OutEntry, OutFile, build_layout, nbytes
from loraport.engine.plan import DTYPES, FLOATS, QUANTIZE_CASTS, MergePlan, build_plan
from loraport.engine.sinks import SafetensorsSink, provenance, write_side_files
from loraport.engine.reading import base_reading
from loraport.engine.sources import check_loadable, open_base
from loraport.engine.stream import stream
from loraport.engine.vocab import adapter_tokenizer, check_tokenizer, config_updates
from loraport.engine.widen import write_config_updates
from loraport.errors import BadInputError, PlanError
from loraport.outputs import check_free_space, check_output, staged_output
from loraport.threads import cores, torch_threads

__all__ = ["DTYPES", "FLOATS", "FUSE_MIN", "MergePlan", "OutEntry", "OutFile", "build_plan", "check_loadable",
           "merge", "merged_tensor", "open_base", "pick_device"]

def merge(base: str | Path, adapters: list[tuple[str | Path, float]] | list[str | Path], out: str | Path, *,
          dtype: str = "auto", device: str = "auto", shard_size: int | None = None, overwrite: bool = False,
          quantize: str | None = None, quant_options: dict | None = None, strict: bool = True,
          adapter_format: str | None = None, fp16_base: str | Path | None = None, progress=None,
          nonfinite: str = "warn", manifest: bool = True, reference: str | Path | None = None,
          hash_cache=True, allow_incomplete: bool = False, force: bool = False,
          tie_embeddings: str = "auto", transformer: str = "transformer") -> dict:
    """Merge adapters into `base` and write the result to `out` (a folder for a folder base, a file for a
    .safetensors base). Returns a report dict. See the module docstring for how. An .onnx base is baked instead
    (loraport/onnx/baking.py): `loraport.api.run_merge` chooses, so `reference` (the HF folder an ONNX base was
    exported from) is refused here.
    `hash_cache`: True reuses the inputs' sha256 remembered by earlier runs (loraport.manifest.HashCache), False
    hashes every input again; a HashCache object is used as given (a batch shares one across its merges).
    `allow_incomplete`: write a model folder even when the base lacks what transformers needs to load it.
    `tie_embeddings`: auto, keep or untie: a tied head's rule when an adapter trains one side (engine/vocab.py).
    `progress`: None, or a callable(total_bytes) returning a context manager whose value is advance(n_bytes).
    `transformer`: a DiT LoRA into a diffusers folder's "transformer", "transformer_2" (Wan 2.2's second expert)
    or "both"."""
    t0 = time.perf_counter()
    adapters = [(a, 1.0) if isinstance(a, (str, Path)) else (a[0], float(a[1])) for a in adapters]
    if not adapters:
        raise BadInputError("no --adapter given")
    base_p = Path(base)
    if reference is not None:
        raise BadInputError("--reference applies to an .onnx --base (baking)")
    out_p = check_output(out, [base, fp16_base, *[a for a, _ in adapters]], overwrite)
    dev = pick_device(device)
    if dev.type == "cuda":  # the CUDA context and cuBLAS start (a second or more) while the adapters are read
        threading.Thread(target=warm_cuda, args=(dev,), daemon=True).start()
    out_dtype, quantizer = _output_options(dtype, quantize, quant_options)

    ckpt = open_base(base_p, fp16_base=fp16_base, quantize=quantize)
    if not allow_incomplete:
        check_loadable(ckpt)
    from loraport import manifest as mf

    cache = mf.HashCache.of(hash_cache)
    # a plain safetensors base is hashed by the stream's reader from the bytes it reads (loraport/hash_tap.py);
    # one too big to stay cached leaves the page cache behind the reader (loraport/pagecache.py)
    with base_reading(ckpt, cache if manifest else None) as reading:
        # the other inputs' sha256 start now, overlapping the adapter reading and planning; the adapters come
        # last: _load_adapters hashes them as it reads them, and the cache shares those digests
        hashes = mf.BackgroundHashes([base, fp16_base, *[a for a, _ in adapters]], cache) if manifest else None
        if quantizer is None and out_dtype is None:
            quantizer = ckpt.own_layout()  # an fp8 base is written back in its own layout unless --dtype says otherwise
        if quantizer is not None:
            quantizer.bind(ckpt)  # compute dtype from the base; warns when re-quantizing an already-quantized base
        loaded, warns = _load_adapters(adapters, ckpt, adapter_format, strict, nonfinite, cache, force, transformer)
        plan = _plan(ckpt, loaded, strict, tie_embeddings, widen=type(ckpt) is Checkpoint and quantizer is None)
        single = ckpt.kind == "safetensors-file"
        if single and shard_size:
            raise BadInputError("--shard-size applies to model folders; the base is a single .safetensors file")
        tok, tok_warns = adapter_tokenizer(loaded) if ckpt.kind == "hf-folder" else ({}, [])
        warns += tok_warns
        check_tokenizer(tok, plan.base, plan.shapes)  # a token the merged embedding has no row for: refused now
        layout = build_layout(plan, out_dtype, quantizer, shard_size)
        total = sum(nbytes(e) for f in layout for e in f.entries)
        check_free_space(out_p.parent, total + sum((ckpt.root / x).stat().st_size for x in ckpt.extra_files))
        prov = provenance(loaded, dtype, quantize, cache.sha256)
        with staged_output(out_p, is_dir=not single, overwrite=overwrite) as stage:
            sink = SafetensorsSink(layout, stage, single, prov, hash_outputs=hashes is not None)
            stats = stream(plan, layout, sink, dev, out_dtype, quantizer, progress=progress, nonfinite=nonfinite,
                           reading=reading)
            if not single:
                write_side_files(plan.base, layout, stage, out_dtype, quantizer, tokenizer=tok,
                                 config_updates=config_updates(plan.base, plan.shapes))
                warns += [f"config changed: {c}" for c in write_config_updates(plan, stage)]  # a widened input
            if hashes is not None:  # the manifest describes the staged files, so it is renamed into place with them
                summary = {"base": str(base_p), "dtype": dtype, "quantize": quantize, "strict": strict,
                           "adapters": _adapter_rows(loaded), "tensors": len(ckpt.names()),
                           "tensors_updated": len(plan.updates), "skipped_targets": len(plan.skipped)}
                man = mf.build(stage, inputs=hashes.result(), plan=summary, name=out_p.name, known=stats["hashes"])
                if not single:
                    mf.write_into(stage, man)
        if hashes is not None and single:
            mf.write_sibling(out_p, man)
    report = {
        "base": str(base_p), "out": str(out_p), "device": str(dev), "dtype": dtype,
        "quantize": quantize, "adapters": _adapter_rows(loaded),
        "tensors": len(ckpt.names()), "tensors_updated": len(plan.updates), "skipped_targets": plan.skipped,
        "files": [f.relpath for f in layout], "bytes_written": stats["bytes"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    report["warnings"] = plan.notes + warns + stats.get("nonfinite", [])
    if hashes is not None:
        report["manifest"] = str(mf.manifest_path(out_p))
    if quantizer is not None:
        report["quantization"] = quantizer.report()
        # surface the quantizer's warnings (e.g. "re-quantization erased most of the adapter") where CI looks
        report["warnings"] += [r["warning"] for r in report["quantization"] if isinstance(r, dict) and r.get("warning")]
    ckpt.close()
    return report


def _output_options(dtype: str, quantize: str | None, quant_options: dict | None):
    """(output dtype or None for the base's, quantizer or None) from --dtype and --quantize."""
    if dtype not in ("auto", *DTYPES):
        raise BadInputError(f"unknown --dtype {dtype!r} (auto, fp32, fp16, bf16)")
    out_dtype: torch.dtype | None = None if dtype == "auto" else DTYPES[dtype]
    quantizer = None
    if quantize:
        if quantize in QUANTIZE_CASTS:
            out_dtype = DTYPES[quantize]
        else:
            from loraport.quant import get_quantizer

            quantizer = get_quantizer(quantize, **(quant_options or {}))
    return out_dtype, quantizer


def _load_adapters(adapters: list[tuple[str | Path, float]], ckpt, adapter_format: str | None, strict: bool,
                   nonfinite: str, cache, force: bool = False, transformer: str = "transformer"
                   ) -> tuple[list[tuple[Adapter, float]], list[str]]:
    """Read, check (NaN/Inf) and hash every adapter; several side by side. Results in adapter order."""
    from loraport.finite import check_adapters, check_mode
    from loraport.formats import load_adapter

    mode = check_mode(nonfinite)

    def load_one(aw: tuple) -> tuple[tuple[Adapter, float], list[str]]:
        with torch_threads(1):  # hundreds of small tensors: one thread each op, no team to wait for
            dit = {} if transformer == "transformer" else {"transformer": transformer}  # DiT readers' option
            ad = (load_adapter(aw[0], format=adapter_format, base=ckpt, strict=strict, force=force, **dit), aw[1])
            warns = ad[0].warnings + check_adapters([ad], mode)  # NaN/Inf in an adapter: warn, or refuse ("fail")
        for f in ad[0].files:  # the provenance's digests (shared with the manifest through the cache)
            if Path(f).is_file():
                cache.sha256(f)
        return ad, warns

    if len(adapters) > 1:  # read, check and hash the adapters side by side (a batch of 8 took 0.4 s one by one)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(adapters), max(2, cores()))) as ex:
            done = list(ex.map(load_one, adapters))  # results (and the first error) in adapter order
    else:
        done = [load_one(adapters[0])]
    return [ad for ad, _ in done], [m for _, ms in done for m in ms]


def _plan(ckpt, loaded: list[tuple[Adapter, float]], strict: bool, tie: str = "auto", widen: bool = False
          ) -> MergePlan:
    try:  # a resized vocabulary needs a config.json to say so: model folders only
        return build_plan(ckpt, loaded, strict=strict, tie=tie, resize=ckpt.kind == "hf-folder", widen=widen)
    except PlanError as e:  # name the adapter file(s) when the message (e.g. a delta's shape check) does not
        if any(a.path in str(e) for a, _ in loaded):
            raise
        raise PlanError(f"{', '.join(a.path for a, _ in loaded)}: {e}") from None


def _adapter_rows(loaded: list[tuple[Adapter, float]]) -> list[dict]:
    return [{"path": a.path, "format": a.format, "weight": w, "targets": len(a.deltas)} for a, w in loaded]
