"""`loraport convert --to onnx`: merged, quantized and multi-LoRA exports (spec: formats/onnx.md).

Structure and weights are separate: `capture()` traces the graph once with meta (storage-free) parameters;
then every initializer the graph names is produced by the merge engine (`merged_tensor`), optionally
quantized, and appended to `model.onnx.data` — one tensor in memory at a time, and untouched tensors not even
that (copied or converted file-to-file in pieces). For a small fp32 export the weights are produced during
the capture by a worker thread (loraport/onnx/prestream.py) and then copied into place. The output folder:

    model.onnx            graph (+ tiny tensors inline), IR version 10
    model.onnx.data       every other initializer, in graph order
    loraport_onnx.json    manifest: kind, dtype, quantization, adapters, LoRA slots (read by `validate`)
    config.json ...       the base folder's non-weight files (tokenizer, generation config)
    adapters/<name>.onnx_adapter   (multi-LoRA only) one ORT adapter file per --adapter
    genai_config.json     (--with-past only) onnxruntime-genai's config (loraport/onnx/genai.py)
    loraport-manifest.json  sha256 of every file above, the inputs' sha256, the plan (`loraport verify`)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from loraport import paths
from loraport._version import __version__
from loraport.errors import BadInputError
from loraport.onnx import prestream
from loraport.onnx.capture import TORCH_DTYPES, capture
from loraport.onnx.external import ONNX_TO_TORCH, ExternalDataWriter
from loraport.onnx.memory import lean_imports
from loraport.progress import each, step

IR_VERSION = 10  # accepted by every onnxruntime >= 1.20 (1.20 rejects > 10) and required for opset 21
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST = "loraport_onnx.json"
DEFAULT_OPSET = 20
QUANT_OPSET = 21


def _adapter_name(path: str, used: set[str]) -> str:
    stem = Path(str(path)).name or "adapter"
    stem = stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "adapter"
    base, i = name, 2
    while name in used:
        name, i = f"{base}-{i}", i + 1
    used.add(name)
    return name


def export_onnx(base: str | Path, adapters: list[tuple[str | Path, float]], out: str | Path, *,
                opset: int | None = None, dtype: str = "fp32", quantize: str | None = None,
                multi_lora: bool = False, with_past: bool = False, overwrite: bool = False,
                device: str = "auto", strict: bool = True, block_size: int = 32, lean: bool = False,
                recapture: bool = False, manifest: bool = True, hash_cache=True, int4: dict | None = None) -> dict:
    """Export base (+ adapters, merged or as switchable .onnx_adapter files) to an ONNX folder `out`.
    `lean`: the caller is a process that ends after this export (the CLI): the capture may leave out optional
    packages transformers would import but never use here (loraport/onnx/memory.py).
    The graph of an architecture captured before is read back from the graph cache (loraport/onnx/graph_cache.py)
    instead of being traced again; `recapture` traces it anyway (and refreshes the cache).
    `int4`: how int4 weights are made (loraport.onnx.quantize.Int4Options' fields: block, symmetric, search,
    accuracy_level); only with quantize="int4".
    `manifest`: write loraport-manifest.json (sha256 of every file, the inputs' sha256, the plan) for
    `loraport verify`; `hash_cache` as in `loraport.merging.merge`."""
    from loraport.onnx import graph_cache
    from loraport.engine.device import pick_device
    from loraport.onnx.adapter_file import adapter_arrays, check_plain, write_adapter_file
    from loraport.onnx.config_check import check_config
    from loraport.onnx.quantize import quantized_tensors, rewrite
    from loraport.onnx.weights import WeightSource
    from loraport.outputs import check_free_space, check_output, staged_output

    t0 = time.perf_counter()
    if dtype not in TORCH_DTYPES:
        raise BadInputError(f"--dtype {dtype!r} is not supported for ONNX (fp32 or fp16)")
    if quantize in ("fp32", "fp16"):
        dtype, quantize = quantize, None
    if quantize not in (None, "int8", "int4"):
        raise BadInputError(f"--quantize {quantize!r} is not available for ONNX (int8, int4)")
    int4_opts = _int4_options(int4, block_size, quantize)
    if opset is None:
        opset = QUANT_OPSET if quantize else DEFAULT_OPSET
    if not 17 <= int(opset) <= 23:
        raise BadInputError(f"--opset {opset}: loraport exports opsets 17-23")
    if quantize == "int8" and opset < 21:
        raise BadInputError(f"--quantize int8 writes per-channel DequantizeLinear for opset >= 21; got --opset {opset}")
    if multi_lora and not adapters:
        raise BadInputError("--multi-lora needs at least one --adapter")
    out_p = check_output(out, [base, *[a for a, _ in adapters if isinstance(a, (str, Path))]], overwrite)
    pick_device(device)
    hashes = None
    if manifest:  # the inputs' sha256 overlap the export (as in merge)
        from loraport import manifest as mf

        hashes = mf.BackgroundHashes([base, *[a for a, _ in adapters if isinstance(a, (str, Path))]],
                                     mf.HashCache.of(hash_cache))

    src = WeightSource(base, adapters, device=device, strict=strict, merge=not multi_lora)
    with contextlib.ExitStack() as stack:  # unwinds in reverse: scratch file, then the staged output, then src
        stack.callback(src.close)
        check_config(src.config, {n: tuple(src.ckpt.info(n).shape) for n in src.ckpt.names()})
        lora_targets = None
        if multi_lora:
            lora_targets = {}
            for ad, _ in src.adapters:
                check_plain(ad)
            from loraport.engine.plan import build_plan

            for ad, w in src.adapters:
                plan = build_plan(src.ckpt, [(ad, w)], strict=strict)
                for name, ups in plan.updates.items():
                    for d, _ in ups:
                        lora_targets[name] = (int(d.A.shape[1]), int(d.B.shape[0]))
        stage = pre = None
        gkey = None if graph_cache.disabled() else graph_cache.key(src.config, dtype, int(opset), lora_targets,
                                                                    with_past)
        cap = graph_cache.load(gkey) if gkey is not None and not recapture else None
        graph_from = "cache" if cap is not None else "capture"
        left_out: list[str] = []
        fp32_bytes = sum(torch.Size(src.ckpt.info(n).shape).numel() * 4 for n in src.ckpt.names())
        if cap is None and prestream.eligible(src, dtype, quantize, fp32_bytes) \
                and _free(out_p.parent) > 2.1 * fp32_bytes:
            # weights written to a scratch file while the graph is captured (see loraport/onnx/prestream.py)
            stage = stack.enter_context(staged_output(out_p, is_dir=True, overwrite=overwrite))
            pre = prestream.Prestream(src, stage).start()
            stack.callback(pre.close)
        if cap is None:
            try:
                with lean_imports(lean) as left_out, step("trace graph"):
                    cap = capture(src.config, dtype=dtype, opset=int(opset), lora_targets=lora_targets,
                                  with_past=with_past)
            except BaseException:
                if pre is not None:
                    pre.cancel()  # stops after the tensor in hand
                raise
            if gkey is not None:
                graph_cache.store(gkey, cap)  # before anything below adds to cap.proto
            if pre is not None:
                pre.finish()
        proto = cap.proto
        float_dtype = TORCH_DTYPES[dtype]
        slot_names = {n for s in cap.lora_slots for n in (s.a_name, s.b_name)}
        qentries = {}
        if quantize:
            weights = {i.name: i.shape for i in cap.inits if i.name not in cap.buffers and i.name not in slot_names
                       and len(i.shape) == 2}
            qentries = rewrite(proto, weights, quantize, proto.graph.input[0].type.tensor_type.elem_type,
                               block=block_size, int4=int4_opts)
        if pre is None:  # (with a scratch file, twice the fp32 size was found free before it was written)
            need = sum(int(torch.Size(i.shape).numel()) * 4 for i in cap.inits)
            check_free_space(out_p.parent, need // (2 if dtype == "fp16" else 1))
        if stage is None:
            stage = stack.enter_context(staged_output(out_p, is_dir=True, overwrite=overwrite))
        writer = ExternalDataWriter(stage, DATA_FILE)
        inits = []
        try:
            for spec in each(cap.inits, "weights+quantize" if qentries else "weights", count=len(cap.inits),
                             written=lambda: writer.bytes_written):
                if spec.name in slot_names:
                    zero = [spec.shape[0], 0] if spec.name.endswith(".lora_A.weight") else [0, spec.shape[1]]
                    inits.append(helper.make_tensor(spec.name, spec.onnx_dtype, zero, vals=[]))
                    continue
                if spec.name in cap.buffers:
                    t = cap.buffers[spec.name].to(ONNX_TO_TORCH[spec.onnx_dtype])
                    inits.append(writer.add(spec.name, t, spec.onnx_dtype, spec.shape))
                    continue
                if pre is not None and spec.name not in qentries:
                    hit = pre.lookup(spec.name, spec.onnx_dtype, spec.shape)
                    if isinstance(hit, TensorProto):
                        inits.append(hit)
                        continue
                    if hit is not None:  # copied in graph order from the scratch file, in the kernel
                        inits.append(writer.add_stored(spec.name, hit, spec.onnx_dtype, spec.shape))
                        continue
                if spec.name not in qentries:
                    stored = src.stored(spec.name)
                    if stored is not None:  # untouched: copied / converted file-to-file in bounded pieces
                        _check_numel(spec, stored.shape)
                        inits.append(writer.add_stored(spec.name, stored, spec.onnx_dtype, spec.shape))
                        continue
                W = src.merged(spec.name, None if spec.name in qentries else ONNX_TO_TORCH[spec.onnx_dtype])
                if tuple(W.shape) != spec.shape:
                    _check_numel(spec, tuple(W.shape))
                    W = W.reshape(spec.shape)
                if spec.name in qentries:
                    for qn, qt in quantized_tensors(qentries[spec.name], W, float_dtype):
                        inits.append(writer.add(qn, qt))
                else:  # converted to the graph's dtype piecewise by the writer
                    inits.append(writer.add(spec.name, W, spec.onnx_dtype, spec.shape))
                del W
        finally:
            writer.close()
        proto.graph.initializer.extend(inits)
        if cap.lora_slots:
            _expose_lora_inputs(proto, cap.lora_slots)
        proto.ir_version = IR_VERSION
        proto.producer_name, proto.producer_version = "loraport", __version__
        with step("save graph + onnx.checker"):
            onnx.save_model(proto, str(stage / MODEL_FILE))
            try:
                onnx.checker.check_model(str(stage / MODEL_FILE))
            except onnx.checker.ValidationError as e:
                raise BadInputError(f"the exported graph failed onnx.checker: {str(e).splitlines()[0][:300]}") \
                    from None
        for rel in src.ckpt.extra_files:
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(paths.member(src.ckpt.root, src.ckpt.root / rel), dst)  # the input-path policy
        genai = genai_note = None
        if cap.with_past:  # onnxruntime-genai opens the folder (it generates from a KV cache: past graphs only)
            from loraport.onnx.genai import write_genai_config

            genai, genai_note = write_genai_config(stage, proto, src.config, src.ckpt.root
                                                   if src.ckpt.root.is_dir() else None, MODEL_FILE)
        adapters_out = []
        used: set[str] = set()
        if multi_lora:
            (stage / "adapters").mkdir()
            slots = {s.module: {"in": s.d_in, "out": s.d_out, "dtype": int(proto.graph.input[0].type.tensor_type
                                                                             .elem_type)} for s in cap.lora_slots}
            elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
            for s in slots.values():
                s["dtype"] = elem
            t2m = {s.target: s.module for s in cap.lora_slots}
            for (ad, w), (path, _) in zip(src.adapters, adapters):
                name = _adapter_name(str(path), used)
                rel = f"adapters/{name}.onnx_adapter"
                write_adapter_file(adapter_arrays(ad, w, slots, t2m), stage / rel)
                adapters_out.append({"name": name, "file": rel, "source": str(Path(str(path)).resolve()),
                                     "weight": w, "format": ad.format, "targets": len(ad.deltas)})
        else:
            for (ad, w), (path, _) in zip(src.adapters, adapters):
                adapters_out.append({"name": _adapter_name(str(path), used), "source": str(Path(str(path))
                                    .resolve()), "weight": w, "format": ad.format, "targets": len(ad.deltas)})
        described = {
            "loraport_version": __version__,
            "kind": "multi-lora" if multi_lora else "merged",
            "model": MODEL_FILE, "data": DATA_FILE, "base": str(Path(base).resolve()),
            "model_type": cap.model_type, "dtype": dtype, "quantize": quantize,
            "block_size": int4_opts.block if int4_opts else None, "opset": int(opset),
            "int4": dataclasses.asdict(int4_opts) if int4_opts else None,
            "ir_version": IR_VERSION, "inputs": cap.input_names, "outputs": cap.output_names,
            "with_past": cap.with_past, "genai_config": genai,
            "adapters": adapters_out,
            "lora_slots": [{"module": s.module, "target": s.target, "in": s.d_in, "out": s.d_out}
                           for s in cap.lora_slots],
            "quantized_weights": len(qentries),
        }
        (stage / MANIFEST).write_text(json.dumps(described, indent=2))
        data_bytes = writer.bytes_written
        if pre is not None:
            pre.close()  # the scratch file goes before the staged output is made final
        if hashes is not None:  # last: it lists every file of the staged folder (scratch file gone)
            summary = _plan(base, src.adapters, adapters, dtype=dtype, quantize=quantize, opset=int(opset),
                            multi_lora=multi_lora, with_past=cap.with_past, strict=strict)
            mf.write_into(stage, mf.build(stage, inputs=hashes.result(), plan=summary))
    report = {
        "out": str(out_p), "kind": described["kind"], "model_type": cap.model_type, "dtype": dtype,
        "quantize": quantize, "opset": int(opset), "ir_version": IR_VERSION, "inputs": cap.input_names,
        "initializers": len(cap.inits), "quantized_weights": len(qentries), "external_data_bytes": data_bytes,
        "adapters": adapters_out, "lora_slots": len(cap.lora_slots),
        "notes": [*cap.notes, *([genai_note] if genai_note else [])],
        "device": str(src.device), "seconds": round(time.perf_counter() - t0, 3),
        "overlapped": pre is not None, "imports_left_out": left_out, "graph": graph_from,
        "genai_config": genai,
    }
    if hashes is not None:
        report["manifest"] = str(mf.manifest_path(out_p))
    return report


def _plan(base, loaded, given, **options) -> dict:
    """The integrity manifest's plan: what was exported from what (paths resolved, for `validate` later)."""
    return {"to": "onnx", "base": str(Path(base).resolve()), **options,
            "adapters": [{"path": str(Path(str(path)).resolve()), "format": ad.format, "weight": w,
                          "targets": len(ad.deltas)} for (ad, w), (path, _) in zip(loaded, given)]}


def _free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _check_numel(spec, shape: tuple[int, ...]) -> None:
    if torch.Size(shape).numel() != torch.Size(spec.shape).numel():
        raise BadInputError(f"{spec.name}: checkpoint shape {list(shape)} != model shape {list(spec.shape)} "
                            "(config.json and weights disagree)")


def _expose_lora_inputs(proto: onnx.ModelProto, slots) -> None:
    """Make each LoRA A/B an overridable initializer: listed in graph.input with a symbolic rank axis
    (`<module>.lora_r`)."""
    g = proto.graph
    elem = {i.name: i.data_type for i in g.initializer}
    for s in slots:
        # one rank axis per module: an adapter may cover only some modules (the rest keep rank 0), and ORT
        # plans buffers assuming equal symbolic dims are equal
        r = f"{s.module}.lora_r"
        g.input.append(helper.make_tensor_value_info(s.a_name, elem[s.a_name], [s.d_in, r]))
        g.input.append(helper.make_tensor_value_info(s.b_name, elem[s.b_name], [r, s.d_out]))
    # shapes inferred at capture time carry the placeholder rank: drop them all
    del g.value_info[:]


def _int4_options(int4: dict | None, block_size: int, quantize: str | None):
    """The checked Int4Options for quantize="int4" (None otherwise); unknown fields refused."""
    from loraport.onnx.quantize import Int4Options

    if quantize != "int4":
        if int4:
            raise BadInputError("int4 options apply to --quantize int4 only")
        return None
    fields = {f.name for f in dataclasses.fields(Int4Options)}
    unknown = sorted(set(int4 or {}) - fields)
    if unknown:
        raise BadInputError(f"unknown int4 option(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    return Int4Options(**{"block": block_size, **(int4 or {})}).check()
