"""Re-quantization to bitsandbytes' 4-bit (NF4 / FP4, optional double quantization) and 8-bit (LLM.int8)
layouts, and reading bitsandbytes-quantized bases. Our own torch quantizers (CPU or CUDA), bit-exact with
bitsandbytes' CPU ops; bitsandbytes itself is only a test-time oracle.

Protocol the merge engine calls:
    q = get_quantizer("nf4" | "fp4" | "int8" | "fp8" | "mxfp4", blocksize=64, double_quant=False, compute_dtype=None)
    q.bind(base)                           # optional: default compute dtype = the base's dtype
    q.entries(name, shape, hint)           # -> [(out_name, dtype, shape), ...] or None (keep unquantized)
    q.quantize(name, merged32, base32)     # -> {out_name: cpu tensor} in the order of entries()
    q.unchanged(name)                      # -> an untouched weight's stored tensors (base already in this layout)
    q.config_update(config)                # -> config.json with `quantization_config`
    q.report()                             # -> per-layer rows + a "(total)" row (with "warning" if erased)
"""

from __future__ import annotations

from loraport.errors import BadInputError

QUANTIZERS = ("nf4", "fp4", "int8", "fp8", "mxfp4")


def get_quantizer(name: str, **options):
    from loraport.quant.quantizer import FourBitQuantizer, Int8Quantizer

    if name in ("nf4", "fp4"):
        return FourBitQuantizer(name, **options)
    if name == "int8":
        opts = {k: v for k, v in options.items() if k not in ("blocksize", "double_quant")}
        return Int8Quantizer(**opts)
    if name == "fp8":
        from loraport.quant.fp8_quantizer import Fp8Quantizer

        return Fp8Quantizer(**{k: v for k, v in options.items() if k not in ("blocksize", "double_quant")})
    if name == "mxfp4":
        from loraport.quant.mxfp4_quantizer import Mxfp4Quantizer

        return Mxfp4Quantizer(**{k: v for k, v in options.items() if k not in ("blocksize", "double_quant")})
    raise BadInputError(f"unknown quantization {name!r} (one of {', '.join(QUANTIZERS)})")


__all__ = ["QUANTIZERS", "get_quantizer"]
