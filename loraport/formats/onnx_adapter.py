"""ONNX Runtime `.onnx_adapter` files (read only; loraport writes them through `loraport convert --to
onnx-adapter`, loraport/onnx). Spec: formats/onnx-adapter.md.

The file (a FlatBuffers "TORT" buffer, read with onnxruntime's own `AdapterFormat.read_adapter`, which
verifies it) maps graph input names to tensors. LoRA pairs are `<module>.lora_A.weight` /
`<module>.lora_B.weight`, either in MatMul layout (A [in, r], B [r, out]: loraport, Olive
convert-adapters, ORT-GenAI) or in PyTorch layout (A [r, in], B [out, r]: ORT's own examples); the layout is
told apart by which axes share the rank. No scale is stored: producers fold it into B, so s = 1.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from loraport.adapter import Adapter, LoraDelta
from loraport.errors import BadInputError
from loraport.paths import regular
from loraport.formats import AdapterFormat, ReadOptions, register, register_export

SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
PREFIXES = ("base_model.model.",)
MAGIC = b"TORT"


def _params(path: Path) -> dict[str, np.ndarray]:
    regular(path)  # a FIFO or /proc file would block onnxruntime's reader
    try:
        import onnxruntime as ort
    except ImportError:
        raise BadInputError("reading .onnx_adapter files needs onnxruntime >= 1.20") from None
    if not hasattr(ort, "AdapterFormat"):
        raise BadInputError(f"onnxruntime {ort.__version__} cannot read .onnx_adapter files (needs >= 1.20)")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
        out = {}
        for k, v in params.items():
            arr = v.numpy()
            out[k] = np.array(arr, copy=True)
    except Exception as e:  # ORT raises RuntimeError / Fail on a malformed buffer
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{path}: not a readable .onnx_adapter file ({msg})") from None
    return out


def _torch(a: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if a.dtype not in (np.float32, np.float16, np.float64):
        raise BadInputError(f"{path}: {key!r} is {a.dtype}; loraport reads float LoRA factors (a quantized adapter "
                            "must be dequantized by its producer)")
    if a.ndim != 2:
        raise BadInputError(f"{path}: {key!r} has shape {list(a.shape)}; LoRA factors are 2-D")
    return torch.from_numpy(np.ascontiguousarray(a))


# `loraport convert --to onnx / onnx-adapter` is the ONNX exporter's (loraport/onnx), not a format writer's
register_export("onnx", "an ONNX model with the adapter(s) merged (loraport/onnx)")
register_export("onnx-adapter", "an .onnx_adapter for a multi-LoRA ONNX graph (loraport/onnx)")


@register
class OnnxAdapterFormat(AdapterFormat):
    name = "onnx-adapter"
    title = "ONNX Runtime .onnx_adapter (read)"
    spec = "onnx-adapter"

    @classmethod
    def detect(cls, path: Path) -> int:
        try:
            if path.is_file():
                with open(regular(path), "rb") as f:
                    head = f.read(8)
                if head[4:8] == MAGIC:
                    return 95
                if path.suffix == ".onnx_adapter":
                    return 40
        except OSError:
            return 0
        return 0

    @classmethod
    def read_with(cls, path: Path, base, opts: ReadOptions) -> Adapter:
        if not path.is_file():
            raise BadInputError(f"{path}: an ONNX adapter is a single .onnx_adapter file")
        params = _params(path)
        pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
        other = []
        for k, a in params.items():
            for suf, role in SUFFIXES.items():
                if k.endswith(suf):
                    mod = k[: -len(suf)]
                    for p in PREFIXES:
                        mod = mod[len(p):] if mod.startswith(p) else mod
                    pairs[mod][role] = (k, _torch(a, path, k))
                    break
            else:
                other.append(k)
        if other:
            hint = " (a quantized adapter?)" if any(".quant." in k for k in other) else ""
            raise BadInputError(f"{path}: {len(other)} parameter(s) are not LoRA factors, e.g. {other[0]!r}{hint}; "
                                "loraport reads <module>.lora_A.weight / .lora_B.weight pairs")
        notes = ["scale folded into lora_B by the producer (s = 1)"]
        deltas = []
        layouts = set()
        for mod, p in pairs.items():
            if "A" not in p or "B" not in p:
                raise BadInputError(f"{path}: {mod!r} has only one of lora_A / lora_B")
            (ka, a), (_, b) = p["A"], p["B"]
            target = f"{mod}.weight"
            if base is not None and target not in base and "model." + target in base:
                target = "model." + target
            matmul = a.shape[1] == b.shape[0]  # A [in, r] · B [r, out]
            torch_ = a.shape[0] == b.shape[1]  # B [out, r] · A [r, in]
            if matmul and torch_:  # r == in == out on one side: the base decides, else the smaller rank wins
                shp = tuple(base.info(target).shape) if base is not None and target in base else None
                if shp is not None:
                    matmul = shp == (b.shape[1], a.shape[0])
                else:
                    matmul = a.shape[1] <= a.shape[0]
            elif not matmul and not torch_:
                raise BadInputError(f"{path}: {mod!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} share no rank")
            A, B = (a.t().contiguous(), b.t().contiguous()) if matmul else (a, b)
            layouts.add("MatMul [in,r]/[r,out]" if matmul else "PyTorch [r,in]/[out,r]")
            deltas.append(LoraDelta(target, A=A, B=B, scale=1.0, transpose=None, alpha=None, scale_rule="baked",
                                    source_key=ka))
        notes.append("factor layout: " + ", ".join(sorted(layouts)))
        return Adapter(deltas, "onnx-adapter", str(path), notes=notes, files=[str(path)], name=path.stem)
