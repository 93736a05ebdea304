"""DiT GGUF bases as ComfyUI-GGUF ships them, written with the real producer library (gguf-py's GGUFWriter and
gguf.quants), following city96/ComfyUI-GGUF's tools/convert.py + llama-quantize (its lcpp.patch) +
tools/fix_5d_tensors.py, restated here:

* tensor names are the single file's own (original BFL / Wan / Qwen-Image names), `model.diffusion_model.`
  stripped (the loader also accepts it kept: `prefix=True`); `general.architecture` = "flux" / "wan" /
  "qwen_image", `general.quantization_version`, `general.file_type`;
* 1-D tensors, tensors of at most `small` elements (convert.py's QUANTIZATION_THRESHOLD, 1024) and the
  arch's high-precision keys (Wan `.modulation`) stay F32; a 2-D+ tensor whose rows are whole blocks of the
  quantization type gets it; the rest F16 (what llama-quantize falls back to); k-quant blocks are random valid
  ones (gguf-py has no k-quant quantizer; gguf.quants dequantizes them, the oracle);
* a 5-D tensor (Wan's Conv3d patch embedding) is added back as F32 with its 5 dimensions (fix_5d_tensors.py);
* `reshape`: tensors stored as [n/256, 256] with `comfy.gguf.orig_shape.<name>` recording the model's shape
  (convert.py's shape_fix, which it applies to SD1/SDXL; ComfyUI's loader honours the key for every arch).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from _gguf_base_util import K_SCALES, _k_blocks

HIPREC = {"wan": (".modulation",)}


def _qtype(name: str, t: np.ndarray, arch: str, qtype: str, small: int) -> str:
    if t.ndim == 1 or t.ndim > 4 or t.size <= small or any(k in name for k in HIPREC.get(arch, ())):
        return "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    return qtype if t.shape[-1] % block == 0 else "F16"


def comfy_gguf(sd: dict[str, torch.Tensor], out: Path, arch: str, qtype: str, *, small: int = 1024,
               prefix: bool = False, reshape: tuple[str, ...] = ()) -> dict[str, str]:
    """Write `sd` (single-file names, fp32) to `out` as described above; returns {tensor name: ggml type}."""
    w = gguf.GGUFWriter(str(out), arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if qtype == "BF16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    types, rng = {}, np.random.default_rng(0)
    for name, v in sd.items():
        t = np.ascontiguousarray(v.float().numpy())
        if name in reshape:
            w.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in t.shape])
            t = t.reshape(-1, 256)
        kind = _qtype(name, t, arch, qtype, small)
        qt = gguf.GGMLQuantizationType[kind]
        data = _k_blocks(t.shape, kind, rng) if kind in K_SCALES else gguf.quants.quantize(t, qt)
        key = f"model.diffusion_model.{name}" if prefix else name
        w.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qt)
        types[key] = kind
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """gguf.GGUFReader + gguf.quants' dequantizer (the reference), in the model's shapes (orig_shape honoured,
    `model.diffusion_model.` kept as stored): the base the GGUF file stands for, as fp32."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        f = r.fields.get(f"comfy.gguf.orig_shape.{t.name}")
        if f is not None:
            shape = tuple(int(f.parts[i][0]) for i in f.data)
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = torch.from_numpy(np.ascontiguousarray(w).reshape(shape))
    return out
