"""The entry points `loraport convert --to onnx / onnx-adapter` call (the convert command lives in
loraport/commands/convert.py and passes its options here as keywords)."""

from __future__ import annotations

import time
from pathlib import Path

from loraport import paths
from loraport.errors import BadInputError
from loraport.jsonfile import read_json


def _adapter_list(kw: dict) -> list[tuple[str, float]]:
    """Accept both spellings: adapters=[(path, weight)] (+ adapter_path) or adapters=[path] + weights=[w]."""
    raw = list(kw.get("adapters") or [])
    weights = list(kw.get("weights") or [])
    first = kw.get("adapter_path")
    if first:
        raw = [first, *raw]
    out: list[tuple[str, float]] = []
    plain = [a for a in raw if not isinstance(a, (tuple, list))]
    if weights and len(weights) != len(plain):
        raise BadInputError(f"{len(weights)} --weight value(s) for {len(plain)} adapter(s); give one per --adapter "
                            "or none")
    wi = iter(weights)
    for a in raw:
        if isinstance(a, (tuple, list)):
            out.append((str(a[0]), float(a[1])))
        else:
            out.append((str(a), float(next(wi)) if weights else 1.0))
    return out


def cli_convert(**kw) -> dict:
    to = kw.get("to")
    out = kw.get("out")
    if not out:
        raise BadInputError("--out is required")
    adapters = _adapter_list(kw)
    if kw.get("lossy") or kw.get("rank"):
        raise BadInputError("--lossy / --rank do not apply to ONNX exports")
    if to == "onnx":
        if kw.get("graph"):
            raise BadInputError("--graph is for --to onnx-adapter (the multi-LoRA graph an adapter file is made for)")
        base = kw.get("base")
        if not base:
            raise BadInputError("--to onnx needs --base (the transformers model folder to export)")
        from loraport.onnx.export import export_onnx
        from loraport.onnx.memory import own_process

        return export_onnx(base, adapters, out, opset=kw.get("opset"), dtype=kw.get("dtype") or "fp32",
                           quantize=kw.get("quantize"), multi_lora=bool(kw.get("multi_lora")),
                           with_past=bool(kw.get("with_past")), overwrite=bool(kw.get("overwrite")),
                           device=kw.get("device") or "auto", lean=own_process(),
                           recapture=bool(kw.get("recapture")), nonfinite=kw.get("nonfinite") or "warn",
                           int4=kw.get("int4"))
    if to == "onnx-adapter":
        flags = (("--multi-lora", "multi_lora"), ("--quantize", "quantize"), ("--with-past", "with_past"),
                 ("--opset", "opset"), ("--recapture", "recapture"), ("--fail-on-nonfinite", "nonfinite"),
                 ("--int4", "int4"))
        unused = [f for f, k in flags if kw.get(k)]
        if unused:
            raise BadInputError(f"{', '.join(unused)} do not apply to --to onnx-adapter")
        if len(adapters) != 1:
            raise BadInputError(f"--to onnx-adapter converts exactly one adapter, got {len(adapters)}")
        if not kw.get("graph"):
            raise BadInputError("--to onnx-adapter needs --graph (the multi-LoRA ONNX folder or model.onnx)")
        path, w = adapters[0]
        return write_onnx_adapter(path, kw["graph"], out, weight=w, base=kw.get("base"), dtype=kw.get("dtype"),
                                  overwrite=bool(kw.get("overwrite")), format=kw.get("format"))
    raise BadInputError(f"loraport.onnx cannot write --to {to!r}")


def write_onnx_adapter(adapter: str, graph: str, out: str, *, weight: float = 1.0, base: str | None = None,
                       dtype: str | None = None, overwrite: bool = False, format: str | None = None) -> dict:
    """Write `adapter` as an .onnx_adapter for the multi-LoRA graph `graph` (folder or .onnx file)."""
    from loraport.formats import load_adapter
    from loraport.onnx.adapter_file import adapter_arrays, graph_slots, write_adapter_file
    from loraport.onnx.export import MANIFEST, MODEL_FILE
    from loraport.outputs import check_output, staged_output

    t0 = time.perf_counter()
    g = Path(graph)
    model = paths.named(g / MODEL_FILE if g.is_dir() else g)
    if not model.is_file():
        raise BadInputError(f"--graph {graph}: no ONNX model found (expected a folder with {MODEL_FILE} "
                            "or a .onnx file)")
    out_p = check_output(out, [adapter, graph, base], overwrite)
    if out_p.suffix != ".onnx_adapter":
        raise BadInputError(f"--out {out}: name the file *.onnx_adapter")
    slots = graph_slots(model)
    if not slots:
        raise BadInputError(f"--graph {graph}: the model has no switchable LoRA inputs (export it with --multi-lora)")
    manifest = {}
    mpath = model.parent / MANIFEST
    if paths.member(model.parent, mpath).is_file():
        try:
            manifest = read_json(mpath, MANIFEST)
        except BadInputError:
            manifest = {}
    t2m = {s["target"]: s["module"] for s in manifest.get("lora_slots", []) if isinstance(s, dict)}
    if dtype:
        want = {"fp32": 1, "fp16": 10}.get(dtype)
        have = next(iter(slots.values()))["dtype"]
        if want != have:
            raise BadInputError(f"--dtype {dtype}: the graph's LoRA inputs are {'fp16' if have == 10 else 'fp32'}; "
                                "adapter dtype must match the graph exactly")
    ckpt = None
    base = base or manifest.get("base")
    if base and Path(base).is_dir():
        from loraport.checkpoint import Checkpoint

        try:
            ckpt = Checkpoint.open(base)
        except BadInputError:
            ckpt = None
    ad = load_adapter(adapter, format=format, base=ckpt)
    arrays = adapter_arrays(ad, weight, slots, t2m)
    from loraport import manifest as mf

    with staged_output(out_p, is_dir=False, overwrite=overwrite) as stage:
        write_adapter_file(arrays, stage)
        # the format has no metadata: a sibling manifest (as merge writes beside a single file) is what lets
        # `verify` check it and `--overwrite` recognise it as loraport's
        man = mf.build(stage, inputs=mf.input_hashes([adapter, model]), name=out_p.name,
                       plan={"graph": str(model), "adapter": str(adapter), "weight": weight})
    mf.write_sibling(out_p, man)
    if ckpt is not None:
        ckpt.close()
    return {"out": str(out_p), "graph": str(model), "adapter": str(adapter), "format": ad.format, "weight": weight,
            "modules": len(arrays) // 2, "graph_slots": len(slots),
            "parameters": int(sum(a.size for a in arrays.values())),
            "seconds": round(time.perf_counter() - t0, 3)}
