"""bitsandbytes' on-disk layout, as transformers 5 + bitsandbytes 0.50 save and load it (spec:
formats/bnb-4bit.md, formats/bnb-int8.md): the tensor keys per quantized Linear, the packed quant-state JSON,
and config.json's `quantization_config`.

4-bit, per weight `<m>.weight` (n = out*in elements, B = ceil(n / blocksize) blocks):
    <m>.weight                                    uint8 [(n+1)//2, 1]   packed codes, high nibble first
    <m>.weight.absmax                             fp32 [B]  (uint8 [B] with double quantization)
    <m>.weight.nested_absmax                      fp32 [ceil(B/256)]    (double quantization only)
    <m>.weight.nested_quant_map                   fp32 [256]            (double quantization only)
    <m>.weight.quant_map                          fp32 [16]
    <m>.weight.quant_state.bitsandbytes__<type>   uint8 [len]           UTF-8 JSON
int8, per weight `<m>.weight`:
    <m>.weight int8 [out, in] · <m>.SCB fp32 [out] · <m>.weight_format uint8 [] (0 = "row")
"""

from __future__ import annotations

import json
import math

import torch

from loraport.quant.tables import code_table, dynamic_map

QS_PREFIX = "quant_state.bitsandbytes__"
AUX_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # "<weight>.<aux>"
AUX_INT8 = ("SCB", "weight_format")  # "<module>.<aux>"
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}
# A float32 written as a Python float is at most 24 characters ("-1.1754943508222875e-38"); the JSON of a
# double-quantized weight is padded with spaces to that width so its length is known before quantizing.
_OFFSET_WIDTH = 24

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def qs_json(quant_type: str, blocksize: int, dtype: torch.dtype, shape: tuple[int, ...],
            offset: float | None = None, pad: bool = False) -> bytes:
    """The quant-state JSON in bitsandbytes' key order and `json.dumps` defaults. With double quantization
    `offset` is the fp32 offset; `pad` adds trailing spaces up to the fixed planned length."""
    d: dict = {"quant_type": quant_type, "blocksize": blocksize, "dtype": DTYPE_NAMES[dtype], "shape": list(shape)}
    if offset is not None:
        d.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(offset)})
    b = json.dumps(d).encode("utf-8")
    if pad:
        b += b" " * (qs_json_len(quant_type, blocksize, dtype, shape, True) - len(b))
    return b


def qs_json_len(quant_type: str, blocksize: int, dtype: torch.dtype, shape: tuple[int, ...], nested: bool) -> int:
    if not nested:
        return len(qs_json(quant_type, blocksize, dtype, shape))
    return len(qs_json(quant_type, blocksize, dtype, shape, offset=0.0)) - len("0.0") + _OFFSET_WIDTH


def entries_4bit(name: str, shape: tuple[int, ...], quant_type: str, blocksize: int, nested: bool,
                 dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    n = math.prod(shape)
    nb = -(-n // blocksize)
    out = [(name, torch.uint8, ((n + 1) // 2, 1)),
           (f"{name}.absmax", torch.uint8 if nested else torch.float32, (nb,))]
    if nested:
        out += [(f"{name}.nested_absmax", torch.float32, (-(-nb // 256),)),
                (f"{name}.nested_quant_map", torch.float32, (256,))]
    out += [(f"{name}.quant_map", torch.float32, (16,)),
            (f"{name}.{QS_PREFIX}{quant_type}", torch.uint8,
             (qs_json_len(quant_type, blocksize, dtype, shape, nested),))]
    return out


def tensors_4bit(name: str, shape: tuple[int, ...], quant_type: str, blocksize: int, dtype: torch.dtype,
                 packed: torch.Tensor, absmax: torch.Tensor, nested: tuple | None) -> dict[str, torch.Tensor]:
    """The tensors of `entries_4bit`, in the same order. `nested` = (codes, nested_absmax, offset) or None."""
    out = {name: packed}
    if nested is None:
        out[f"{name}.absmax"] = absmax
    else:
        q, nested_absmax, offset = nested
        out[f"{name}.absmax"] = q
        out[f"{name}.nested_absmax"] = nested_absmax
        out[f"{name}.nested_quant_map"] = dynamic_map().clone()
    out[f"{name}.quant_map"] = code_table(quant_type).clone()
    js = qs_json(quant_type, blocksize, dtype, shape, None if nested is None else float(nested[2]),
                 pad=nested is not None)
    out[f"{name}.{QS_PREFIX}{quant_type}"] = torch.frombuffer(bytearray(js), dtype=torch.uint8)
    return out


def entries_int8(name: str, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    module = name.removesuffix(".weight")
    return [(name, torch.int8, tuple(shape)), (f"{module}.SCB", torch.float32, (shape[0],)),
            (f"{module}.weight_format", torch.uint8, ())]


def tensors_int8(name: str, CB: torch.Tensor, SCB: torch.Tensor) -> dict[str, torch.Tensor]:
    module = name.removesuffix(".weight")
    return {name: CB, f"{module}.SCB": SCB, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}


def quantization_config(bits: int, *, quant_type: str = "fp4", double_quant: bool = False,
                        compute_dtype: torch.dtype = torch.float32, skip_modules: list[str] | None = None) -> dict:
    """config.json's `quantization_config` with every field transformers 5.24 writes (alphabetical, as saved).
    BitsAndBytesConfig's defaults differ from what we write (fp4, float32), so nothing is left implicit."""
    four = bits == 4
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": DTYPE_NAMES[compute_dtype] if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type if four else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def parse_qs_json(raw: torch.Tensor, where: str) -> dict:
    """Decode a stored quant-state JSON tensor (uint8 bytes) into a dict, validating the fields we use."""
    from loraport.errors import BadInputError

    if raw.numel() > 1 << 16:
        raise BadInputError(f"{where}: quant_state JSON of {raw.numel()} bytes is not a bitsandbytes quant state")
    try:
        d = json.loads(bytes(raw.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{where}: quant_state JSON is not valid ({e})") from None
    if not isinstance(d, dict):
        raise BadInputError(f"{where}: quant_state JSON is not an object")
    qt, bs, dt, shape = d.get("quant_type"), d.get("blocksize"), d.get("dtype"), d.get("shape")
    if qt not in ("nf4", "fp4"):
        raise BadInputError(f"{where}: quant_type {str(qt)[:20]!r} is not nf4/fp4")
    if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0 or bs & (bs - 1):
        raise BadInputError(f"{where}: blocksize {str(bs)[:20]!r} is not a power of two")
    if dt not in NAME_DTYPES:
        raise BadInputError(f"{where}: dtype {str(dt)[:20]!r} is not float16/bfloat16/float32")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**40 for s in shape)):
        raise BadInputError(f"{where}: shape {str(shape)[:40]} is invalid")
    if "nested_offset" in d:
        off = d["nested_offset"]
        if not isinstance(off, (int, float)) or isinstance(off, bool) or not math.isfinite(off):
            raise BadInputError(f"{where}: nested_offset {str(off)[:20]!r} is not a finite number")
        if d.get("nested_blocksize", 256) != 256:
            raise BadInputError(f"{where}: nested_blocksize {d.get('nested_blocksize')!r} is not supported (256)")
    return d
