"""`loraport convert --to onnx`: merged, quantized and multi-LoRA exports (spec: formats/onnx.md).

Structure and weights are separate: `capture()` traces the graph once with meta (storage-free) parameters;
then the merge engine's one stream (`loraport.engine.stream`) produces every initializer the graph names, in
graph order — read from the checkpoint (onnx/weights.py: the graph's names), merged in fp32, optionally
quantized (onnx/quantize.py), rounded once, checked for NaN/Inf — and hands it to the ONNX external-data sink
(onnx/sink.py), which appends it to `model.onnx.data`; untouched tensors are copied file-to-file in the kernel.
Bounded reused buffers, overlapped read / compute / write and progress are the stream's. The output folder:

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
from loraport.onnx.capture import TORCH_DTYPES, capture
from loraport.onnx.external import ONNX_TO_TORCH, ExternalDataWriter
from loraport.onnx.memory import lean_imports
from loraport.progress import step

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
                recapture: bool = False, manifest: bool = True, hash_cache=True, nonfinite: str = "warn",
                int4: dict | None = None) -> dict:
    """Export base (+ adapters, merged or as switchable .onnx_adapter files) to an ONNX folder `out`.
    `lean`: the caller is a process that ends after this export (the CLI): the capture may leave out optional
    packages transformers would import but never use here (loraport/onnx/memory.py).
    The graph of an architecture captured before is read back from the graph cache (loraport/onnx/graph_cache.py)
    instead of being traced again; `recapture` traces it anyway (and refreshes the cache).
    `int4`: how int4 weights are made (loraport.onnx.quantize.Int4Options' fields: block, symmetric, search,
    accuracy_level); only with quantize="int4".
    `manifest`: write loraport-manifest.json (sha256 of every file, the inputs' sha256, the plan) for
    `loraport verify`; `hash_cache` as in `loraport.merging.merge`; `nonfinite` ("warn" or "fail") as in merge:
    NaN/Inf in an adapter or in a merged weight is reported, or refused before the output is renamed into place."""
    from loraport.engine.device import pick_device
    from loraport.onnx.config_check import check_config
    from loraport.onnx.weights import WeightSource
    from loraport.outputs import check_output, staged_output

    t0 = time.perf_counter()
    dtype, quantize, opset = _options(adapters, opset, dtype, quantize, multi_lora)
    int4_opts = _int4_options(int4, block_size, quantize)
    out_p = check_output(out, [base, *_paths(adapters)], overwrite)
    pick_device(device)
    hashes = None
    if manifest:  # the inputs' sha256 overlap the export (as in merge)
        from loraport import manifest as mf

        hashes = mf.BackgroundHashes([base, *_paths(adapters)], mf.HashCache.of(hash_cache))

    src = WeightSource(base, adapters, device=device, strict=strict, merge=not multi_lora, nonfinite=nonfinite)
    with contextlib.ExitStack() as stack:  # unwinds in reverse: the staged output, then src
        stack.callback(src.close)
        check_config(src.config, {n: tuple(src.ckpt.info(n).shape) for n in src.ckpt.names()})
        lora_targets = _lora_targets(src, strict) if multi_lora else None
        cap, graph_from, left_out = _graph(src.config, dtype, opset, lora_targets, with_past, lean, recapture)
        qentries = _quantize_graph(cap, quantize, block_size, int4_opts)
        _check_space(cap, out_p, dtype)
        stage = stack.enter_context(staged_output(out_p, is_dir=True, overwrite=overwrite))
        stats = _write_weights(src, cap, qentries, dtype, stage)
        _save_graph(cap, stage)
        _copy_side_files(src, stage)
        genai, genai_note = _genai(cap, src, stage)
        adapters_out = _adapter_entries(src, adapters, cap, dtype, stage, multi_lora)
        described = _describe(base, cap, dtype, quantize, int4_opts, opset, genai, adapters_out, qentries,
                              multi_lora)
        (stage / MANIFEST).write_text(json.dumps(described, indent=2))
        if hashes is not None:  # last: it lists every file of the staged folder
            summary = _plan(base, src.adapters, adapters, dtype=dtype, quantize=quantize, opset=int(opset),
                            multi_lora=multi_lora, with_past=cap.with_past, strict=strict)
            mf.write_into(stage, mf.build(stage, inputs=hashes.result(), plan=summary))
    report = {
        "out": str(out_p), "kind": described["kind"], "model_type": cap.model_type, "dtype": dtype,
        "quantize": quantize, "opset": int(opset), "ir_version": IR_VERSION, "inputs": cap.input_names,
        "initializers": len(cap.inits), "quantized_weights": len(qentries), "external_data_bytes": stats["bytes"],
        "adapters": adapters_out, "lora_slots": len(cap.lora_slots),
        "notes": [*cap.notes, *([genai_note] if genai_note else [])],
        "device": str(src.device), "seconds": round(time.perf_counter() - t0, 3),
        "imports_left_out": left_out, "graph": graph_from, "genai_config": genai,
        "warnings": src.warnings + stats["nonfinite"],
    }
    if hashes is not None:
        report["manifest"] = str(mf.manifest_path(out_p))
    return report


def _paths(adapters) -> list:
    return [a for a, _ in adapters if isinstance(a, (str, Path))]


def _options(adapters, opset: int | None, dtype: str, quantize: str | None, multi_lora: bool):
    """(dtype, quantize, opset) checked and normalised (--quantize fp16 is --dtype fp16)."""
    if dtype not in TORCH_DTYPES:
        raise BadInputError(f"--dtype {dtype!r} is not supported for ONNX (fp32 or fp16)")
    if quantize in ("fp32", "fp16"):
        dtype, quantize = quantize, None
    if quantize not in (None, "int8", "int4"):
        raise BadInputError(f"--quantize {quantize!r} is not available for ONNX (int8, int4)")
    if opset is None:
        opset = QUANT_OPSET if quantize else DEFAULT_OPSET
    if not 17 <= int(opset) <= 23:
        raise BadInputError(f"--opset {opset}: loraport exports opsets 17-23")
    if quantize == "int8" and opset < 21:
        raise BadInputError(f"--quantize int8 writes per-channel DequantizeLinear for opset >= 21; got --opset {opset}")
    if multi_lora and not adapters:
        raise BadInputError("--multi-lora needs at least one --adapter")
    return dtype, quantize, opset


def _lora_targets(src, strict: bool) -> dict[str, tuple[int, int]]:
    """Multi-LoRA: every weight some adapter updates, with its (in, out) (plain LoRA only)."""
    from loraport.engine.plan import build_plan
    from loraport.onnx.adapter_file import check_plain

    targets: dict[str, tuple[int, int]] = {}
    for ad, _ in src.adapters:
        check_plain(ad)
    for ad, w in src.adapters:
        plan = build_plan(src.ckpt, [(ad, w)], strict=strict)
        for name, ups in plan.updates.items():
            for d, _ in ups:
                targets[name] = (int(d.A.shape[1]), int(d.B.shape[0]))
    return targets


def _graph(config: dict, dtype: str, opset: int, lora_targets, with_past: bool, lean: bool, recapture: bool):
    """(the captured graph, "cache" or "capture", the imports left out): read back from the graph cache, or
    traced (and remembered)."""
    from loraport.onnx import graph_cache

    gkey = None if graph_cache.disabled() else graph_cache.key(config, dtype, int(opset), lora_targets, with_past)
    cap = graph_cache.load(gkey) if gkey is not None and not recapture else None
    if cap is not None:
        return cap, "cache", []
    with lean_imports(lean) as left_out, step("trace graph"):
        cap = capture(config, dtype=dtype, opset=int(opset), lora_targets=lora_targets, with_past=with_past)
    if gkey is not None:
        graph_cache.store(gkey, cap)  # before anything below adds to cap.proto
    return cap, "capture", left_out


def _slot_names(cap) -> set[str]:
    return {n for s in cap.lora_slots for n in (s.a_name, s.b_name)}


def _quantize_graph(cap, quantize: str | None, block_size: int, int4_opts=None) -> dict:
    """The graph rewritten for quantized weights; {weight: QuantEntry} ({} without --quantize)."""
    if not quantize:
        return {}
    from loraport.onnx.quantize import rewrite

    slots = _slot_names(cap)
    weights = {i.name: i.shape for i in cap.inits if i.name not in cap.buffers and i.name not in slots
               and len(i.shape) == 2}
    return rewrite(cap.proto, weights, quantize, cap.proto.graph.input[0].type.tensor_type.elem_type,
                   block=block_size, int4=int4_opts)


def _check_space(cap, out_p: Path, dtype: str) -> None:
    from loraport.outputs import check_free_space

    need = sum(int(torch.Size(i.shape).numel()) * 4 for i in cap.inits)
    check_free_space(out_p.parent, need // (2 if dtype == "fp16" else 1))


def _write_weights(src, cap, qentries: dict, dtype: str, stage: Path) -> dict:
    """Every initializer of the graph, in graph order, through the merge engine's stream (read ► merge ►
    quantize or round ► finite check ► the external-data sink); the LoRA slots of a multi-LoRA graph are empty
    inline tensors. Adds the initializers to cap.proto; the stream's stats."""
    from loraport.engine.layout import OutEntry
    from loraport.engine.stream import stream
    from loraport.onnx.quantize import GraphQuantizer, entry_layout
    from loraport.onnx.sink import OnnxDataSink, data_layout
    from loraport.onnx.weights import GraphSource

    float_dtype = TORCH_DTYPES[dtype]
    slots = _slot_names(cap)
    specs = [s for s in cap.inits if s.name not in slots]
    source = GraphSource(src, specs, cap.buffers)
    entries = []
    for spec in specs:
        if spec.name in qentries:
            entries += [OutEntry(spec.name, n, dt, sh) for n, dt, sh in entry_layout(qentries[spec.name], float_dtype)]
        else:
            entries.append(OutEntry(spec.name, spec.name, ONNX_TO_TORCH[spec.onnx_dtype], tuple(spec.shape)))
    layout = data_layout(DATA_FILE, entries)
    sink = OnnxDataSink(ExternalDataWriter(stage, DATA_FILE), layout)
    quantizer = GraphQuantizer(qentries, float_dtype) if qentries else None
    stats = stream(source.plan(), layout, sink, src.device, float_dtype, quantizer, nonfinite=src.nonfinite,
                   label="weights+quantize" if qentries else "weights")
    inits = []
    for spec in cap.inits:
        if spec.name in slots:
            zero = [spec.shape[0], 0] if spec.name.endswith(".lora_A.weight") else [0, spec.shape[1]]
            inits.append(helper.make_tensor(spec.name, spec.onnx_dtype, zero, vals=[]))
        else:
            inits += sink.protos[spec.name]
    cap.proto.graph.initializer.extend(inits)
    stats["bytes"] = sink.writer.bytes_written
    return stats


def _save_graph(cap, stage: Path) -> None:
    proto = cap.proto
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


def _copy_side_files(src, stage: Path) -> None:
    for rel in src.ckpt.extra_files:
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(paths.member(src.ckpt.root, src.ckpt.root / rel), dst)  # the input-path policy


def _genai(cap, src, stage: Path):
    """onnxruntime-genai's config for a past graph (it generates from a KV cache): (file name, note)."""
    if not cap.with_past:
        return None, None
    from loraport.onnx.genai import write_genai_config

    return write_genai_config(stage, cap.proto, src.config, src.ckpt.root if src.ckpt.root.is_dir() else None,
                              MODEL_FILE)


def _adapter_entries(src, adapters, cap, dtype: str, stage: Path, multi_lora: bool) -> list[dict]:
    """The manifest's adapter rows; with multi_lora, each adapter written as adapters/<name>.onnx_adapter."""
    used: set[str] = set()
    rows = []
    if not multi_lora:
        for (ad, w), (path, _) in zip(src.adapters, adapters):
            rows.append({"name": _adapter_name(str(path), used), "source": str(Path(str(path)).resolve()),
                         "weight": w, "format": ad.format, "targets": len(ad.deltas)})
        return rows
    from loraport.onnx.adapter_file import adapter_arrays, write_adapter_file

    (stage / "adapters").mkdir()
    elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    slots = {s.module: {"in": s.d_in, "out": s.d_out, "dtype": elem} for s in cap.lora_slots}
    t2m = {s.target: s.module for s in cap.lora_slots}
    for (ad, w), (path, _) in zip(src.adapters, adapters):
        name = _adapter_name(str(path), used)
        rel = f"adapters/{name}.onnx_adapter"
        write_adapter_file(adapter_arrays(ad, w, slots, t2m), stage / rel)
        rows.append({"name": name, "file": rel, "source": str(Path(str(path)).resolve()),
                     "weight": w, "format": ad.format, "targets": len(ad.deltas)})
    return rows


def _describe(base, cap, dtype: str, quantize, int4_opts, opset, genai, adapters_out, qentries,
              multi_lora: bool) -> dict:
    """loraport_onnx.json: what the folder holds (read by `validate`)."""
    return {
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


def _plan(base, loaded, given, **options) -> dict:
    """The integrity manifest's plan: what was exported from what (paths resolved, for `validate` later)."""
    return {"to": "onnx", "base": str(Path(base).resolve()), **options,
            "adapters": [{"path": str(Path(str(path)).resolve()), "format": ad.format, "weight": w,
                          "targets": len(ad.deltas)} for (ad, w), (path, _) in zip(loaded, given)]}


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
