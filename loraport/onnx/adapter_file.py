"""ONNX Runtime `.onnx_adapter` files for loraport's multi-LoRA graphs (spec: formats/onnx-adapter.md).

A multi-LoRA graph has, for each adapted module `M`, two overridable initializers `M.lora_A.weight` [in, r]
and `M.lora_B.weight` [r, out] (MatMul layout, symbolic r, zero-rank defaults). An adapter file holds the
same names with the adapter's factors: A = Aᵀ, B = (weight·scale)·Bᵀ — the scale is folded into B so the
graph has no per-adapter constant. Only plain 2-D LoRA can be expressed this way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loraport.adapter import Adapter, Delta
from loraport.errors import BadInputError

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
NP_DTYPES = {1: np.float32, 10: np.float16}  # ONNX elem type -> numpy


def check_plain(adapter: Adapter) -> None:
    """Raise unless every delta is a plain 2-D LoRA (what a MatMul branch can compute)."""
    for d in adapter.deltas:
        if not d.plain_lora or d.rows is not None:
            what = ("a row slice of a fused tensor" if d.plain_lora
                    else "Tucker/conv" if d.label == "lora" else d.label)
            raise BadInputError(f"{adapter.path or adapter.name}: {d.target} is {what}, which a multi-LoRA graph "
                                "cannot switch at run time; export it merged (loraport convert --to onnx)")


def lora_factors(d: Delta, weight: float, np_dtype) -> tuple[np.ndarray, np.ndarray]:
    """(A [in, r], B [r, out]) in MatMul layout with weight·scale folded into B, of a plain LoRA."""
    f = d.low_rank_factors()
    A = f.A.detach().to(torch.float32).t().contiguous()
    B = (f.B.detach().to(torch.float32) * float(weight * f.scale)).t().contiguous()
    return A.numpy().astype(np_dtype, copy=False), B.numpy().astype(np_dtype, copy=False)


def graph_slots(model_path: str | Path) -> dict[str, dict]:
    """The LoRA slots a graph exposes: module -> {"in", "out", "dtype"} read from its overridable inputs."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    slots: dict[str, dict] = {}
    for vi in m.graph.input:
        if vi.name.endswith(A_SUFFIX) and vi.name in inits:
            mod = vi.name[: -len(A_SUFFIX)]
            tt = vi.type.tensor_type
            d_in = tt.shape.dim[0].dim_value
            b = next((x for x in m.graph.input if x.name == mod + B_SUFFIX), None)
            if b is None:
                continue
            d_out = b.type.tensor_type.shape.dim[1].dim_value
            slots[mod] = {"in": d_in, "out": d_out, "dtype": tt.elem_type}
    return slots


def adapter_arrays(adapter: Adapter, weight: float, slots: dict[str, dict],
                   target_to_module: dict[str, str]) -> dict[str, np.ndarray]:
    """{graph input name: array} for `adapter` on a graph with `slots`."""
    check_plain(adapter)
    out: dict[str, np.ndarray] = {}
    missing = []
    for d in adapter.deltas:
        mod = target_to_module.get(d.target)
        if mod is None:
            stem = d.target[: -len(".weight")] if d.target.endswith(".weight") else d.target
            mod = next((m for m in (stem, "model." + stem, stem.split(".", 1)[-1]) if m in slots), None)
        if mod is None or mod not in slots:
            missing.append(d.target)
            continue
        s = slots[mod]
        A, B = lora_factors(d, weight, NP_DTYPES.get(s["dtype"], np.float32))
        if A.shape[0] != s["in"] or B.shape[1] != s["out"]:
            raise BadInputError(f"{adapter.path}: {d.target} has shape in={A.shape[0]} out={B.shape[1]}, the graph's "
                                f"slot {mod} is in={s['in']} out={s['out']}")
        out[mod + A_SUFFIX] = A
        out[mod + B_SUFFIX] = B
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise BadInputError(f"{adapter.path}: the graph has no LoRA slot for {len(missing)} target(s): {shown}; "
                            "re-export the multi-LoRA graph with this adapter among its --adapter list")
    return out


def write_adapter_file(arrays: dict[str, np.ndarray], path: str | Path, adapter_version: int = 1,
                       model_version: int = 1) -> None:
    import onnxruntime as ort

    if not hasattr(ort, "AdapterFormat"):
        raise BadInputError(f"onnxruntime {ort.__version__} cannot write .onnx_adapter files (needs >= 1.20)")
    # keep the arrays and OrtValues referenced until export_adapter returns: ORT stores only raw pointers
    keep = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    vals = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in keep.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    fmt.set_parameters(vals)
    fmt.export_adapter(str(path))
    del fmt, vals, keep


def read_adapter_file(path: str | Path) -> dict[str, np.ndarray]:
    """The parameters of an .onnx_adapter file as numpy arrays (copies)."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as e:  # ORT raises RuntimeError/Fail for a malformed file
        raise BadInputError(f"{path}: not a readable .onnx_adapter file ({str(e).splitlines()[0][:200]})") from None
    return {k: np.array(v.numpy()) for k, v in fmt.get_parameters().items()}
