"""Builders for tiny fp8 bases, made from the committed bf16 Llama fixture by each layout's producer where it
runs here: transformers' FineGrainedFP8 quantizer (block), compressed-tensors' observer + quantize (tensor /
channel, skipped without it). ComfyUI cannot be installed: its scaled-fp8 and plain files follow its documented
layout (scale = amax / fp8_max, `scaled_fp8` marker)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests._quant_util import BF16

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear(k: str) -> bool:
    return k.endswith(".weight") and any(f".{m}." in k for m in LINEARS)


def hf_fp8_quantizer(block=(32, 32)):
    """transformers' own FineGrainedFP8 weight quantizer (the op save_pretrained runs)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    return Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=tuple(block))))


def _copy_base(dst: Path) -> tuple[dict, dict]:
    shutil.copytree(BF16, dst)
    return load_file(dst / "model.safetensors"), json.loads((dst / "config.json").read_text())


def _save(dst: Path, sd: dict, cfg: dict | None) -> Path:
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if cfg is not None:
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def block_base(dst: Path, block=(32, 32)) -> Path:
    """DeepSeek / FineGrainedFP8 layout, every Linear (lm_head too, which lora-small leaves untouched)."""
    sd, cfg = _copy_base(dst)
    op = hf_fp8_quantizer(block)
    out = {}
    for k, v in sd.items():
        out.update(op._quantize_one(k, v) if _is_linear(k) or k == "lm_head.weight" else {k: v})
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    return _save(dst, out, cfg)


def ct_quantize(W: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' symmetric fp8 weight observer + quantize for `W` (held in its own dtype)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    del ct
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)
    if strategy == "channel":
        lo, hi = W.amin(dim=1, keepdim=True), W.amax(dim=1, keepdim=True)
    else:
        lo, hi = W.amin().reshape(1), W.amax().reshape(1)
    scale, zp = calculate_qparams(lo, hi, args)
    q = quantize(W, scale, zp, args, dtype=torch.float8_e4m3fn)
    return q, scale


def ct_config(cfg: dict) -> dict:
    w = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "observer": "minmax"}
    act = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["re:.*self_attn.*"], "weights": {**w, "strategy": "tensor"},
                        "input_activations": act, "format": "float-quantized"},
            "group_1": {"targets": ["re:.*mlp.*"], "weights": {**w, "strategy": "channel"},
                        "input_activations": act, "format": "float-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None}
    return cfg


def ct_base(dst: Path) -> Path:
    """llm-compressor's FP8 layout: attention per-tensor, MLP per-channel scales in the model dtype."""
    sd, cfg = _copy_base(dst)
    out = {}
    for k, v in sd.items():
        if _is_linear(k):
            q, s = ct_quantize(v, "tensor" if "self_attn" in k else "channel")
            out[k], out[k[: -len("weight")] + "weight_scale"] = q, s
        else:
            out[k] = v
    return _save(dst, out, ct_config(cfg))


def comfy_scaled(W: torch.Tensor, dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's documented per-tensor rule (QUANTIZATION.md): scale = amax / max; q = (W / scale) cast."""
    W = W.float()
    scale = W.abs().amax() / torch.finfo(dtype).max
    return (W / scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype), scale


def comfy_file(dst: Path, scaled: bool = True, dtype=torch.float8_e4m3fn) -> Path:
    """A single .safetensors file: Linear weights fp8 (+ `scale_weight` and the `scaled_fp8` marker when
    scaled); one `scale_input` riding along."""
    sd = load_file(BF16 / "model.safetensors")
    out = {}
    for k, v in sd.items():
        if _is_linear(k):
            if scaled:
                out[k], out[k[: -len("weight")] + "scale_weight"] = comfy_scaled(v, dtype)
            else:
                out[k] = v.float().to(dtype)
        else:
            out[k] = v
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=dtype)
        out["model.layers.0.self_attn.q_proj.scale_input"] = torch.tensor(0.5)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, dst)
    return dst
