"""A bitsandbytes-quantized model folder (as transformers saves it) seen as an ordinary base: logical weight
names, shapes and dtypes, each quantized weight dequantized on `get` by our own dequantizers (no bitsandbytes,
no CUDA, and never through `Linear4bit.forward`, which rewrites the quant state on some CPUs).

    ck = open_quantized_base(Checkpoint.open(path))    # what the merge engine calls
    ck.names()        # logical names: "<m>.weight" once; absmax/quant_map/nested_*/quant_state/SCB/... hidden
    ck.info(name)     # dtype = the quant state's dtype (4-bit) or the model dtype (int8); logical shape
    ck.get(name)      # the dequantized tensor in that dtype (what bitsandbytes' dequantize gives)
    ck.get32(name)    # the same in fp32, before the final rounding
    ck.config         # config.json without `quantization_config` (for a 16-bit output)

GPT-2-style Conv1D weights are stored by transformers in Linear orientation [out, in]; they are served
transposed back to the model's own [in, out] layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loraport import paths
from loraport.checkpoint import CONV1D_LAYERS, Checkpoint
from loraport.errors import BadInputError
from loraport.quant import bnb_layout as L
from loraport.quant.dequant_view import DequantizedView
from loraport.quant.blockwise import dequantize_4bit, dequantize_absmax
from loraport.quant.rowwise import dequantize_int8
from loraport.jsonfile import read_json

_QS = re.compile(r"^(?P<w>.+)\.quant_state\.bitsandbytes__(?P<t>nf4|fp4)$")


@dataclass
class QuantSpec:
    """How to rebuild one logical weight: its kind and the global names of the stored tensors it uses."""

    kind: str  # "4bit" | "int8"
    weight: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # logical (model) orientation
    stored_shape: tuple[int, ...]  # as quantized ([out, in] for Conv1D too)
    aux: dict[str, str]
    state: dict | None = None  # 4-bit quant-state JSON

    @property
    def transposed(self) -> bool:
        return self.shape != self.stored_shape


def is_bnb_folder(path: str | Path) -> bool:
    """A folder whose config.json says quant_method "bitsandbytes" or whose weights carry bnb quant state."""
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        cfg = read_json(paths.member(p, p / "config.json"))
        qc = cfg.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes":
            return True
    except (OSError, ValueError, BadInputError):
        pass
    try:
        ck = Checkpoint.open(p)
    except BadInputError:
        return False
    try:
        return bool(_find_specs(ck))
    except BadInputError:
        return True
    finally:
        ck.close()


def open_quantized_base(ckpt: Checkpoint, fp16_base: str | Path | None = None, quantize: str | None = None):
    """The engine's entry point for a quantized --base. Without --fp16-base: the dequantized view (merging
    into dequant(W), exactly what a QLoRA adapter was trained against). With --fp16-base: the original 16-bit
    checkpoint, after checking that it is the same model (names and shapes)."""
    if fp16_base is not None and not _find_specs(ckpt):
        raise BadInputError(f"--fp16-base is only meaningful with a bitsandbytes-quantized --base; {ckpt.root} is "
                            f"not quantized (merge into it directly)")
    bnb = BnbCheckpoint.from_checkpoint(ckpt)
    if fp16_base is None:
        return bnb
    fp = Checkpoint.open(fp16_base)
    fp_q = fp.config.get("quantization_config") if isinstance(fp.config, dict) else None
    if isinstance(fp_q, dict) or any(n.endswith((".SCB", ".absmax")) or ".quant_state." in n for n in fp.names()):
        raise BadInputError(f"{fp16_base}: --fp16-base must be the original 16-bit model, this one is quantized")
    for name in bnb.names():
        if name not in fp:
            raise BadInputError(f"{fp16_base}: tensor {name!r} of the quantized base is missing; --fp16-base must "
                                f"be the model the quantized base was made from")
        a, b = tuple(bnb.info(name).shape), tuple(fp.info(name).shape)
        if a != b:
            raise BadInputError(f"{fp16_base}: {name} is {list(b)} but {list(a)} in the quantized base; "
                                f"--fp16-base must be the model the quantized base was made from")
    fp.quantized_source = bnb.quant
    return fp


class BnbCheckpoint(DequantizedView):
    """A Checkpoint whose quantized weights are served dequantized (see the module docstring)."""

    @classmethod
    def open(cls, path: str | Path) -> BnbCheckpoint:  # type: ignore[override]
        return cls.from_checkpoint(Checkpoint.open(path))

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> BnbCheckpoint:
        specs = _find_specs(ck)
        if not specs:
            raise BadInputError(f"{ck.root}: no bitsandbytes-quantized weights found (no *.quant_state.bitsandbytes__* "
                                f"or *.SCB tensors); is this a quantized model?")
        self = cls._view(ck, specs)
        kinds = {s.kind for s in specs.values()}
        first = next(iter(specs.values()))
        self.quant = {"bits": 4 if "4bit" in kinds else 8,
                      "quant_type": first.state["quant_type"] if first.state else None,
                      "blocksize": first.state["blocksize"] if first.state else None,
                      "double_quant": any("nested_absmax" in s.aux for s in specs.values()),
                      "quantized_tensors": len(specs)}
        self.config_rewritten = True  # config differs from the stored config.json (quantization_config removed)
        return self

    def is_quantized(self, name: str) -> bool:
        return name in self.specs

    def storage_of(self, name: str) -> str:
        spec = self.specs.get(name)
        if spec is None:
            return super().storage_of(name)
        return f"{spec.state['quant_type'] if spec.state else 'int8'} (bitsandbytes)"

    def get32(self, name: str) -> torch.Tensor:
        spec = self.specs.get(name)
        if spec is None:
            return super().get(name).to(torch.float32)
        return self._dequant(spec, torch.float32)

    def get(self, name: str) -> torch.Tensor:
        spec = self.specs.get(name)
        if spec is None:
            return super().get(name)
        return self._dequant(spec, spec.dtype)

    def raw(self, name: str) -> memoryview:
        sh, key = self.shard_of(name)
        return sh.file.raw(key)

    def close(self) -> None:
        self.stored.close()

    def _dequant(self, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
        st = self.stored
        if spec.kind == "4bit":
            s = spec.state
            packed = st.get(spec.weight)
            absmax = st.get(spec.aux["absmax"])
            if "nested_absmax" in spec.aux:
                absmax = dequantize_absmax(absmax, st.get(spec.aux["nested_absmax"]), float(s["nested_offset"]),
                                           st.get(spec.aux["nested_quant_map"]))
            W = dequantize_4bit(packed, absmax.to(torch.float32), s["quant_type"], s["blocksize"],
                                spec.stored_shape, torch.float32)
        else:
            W = dequantize_int8(st.get(spec.weight), st.get(spec.aux["SCB"]).to(torch.float32))
        if spec.transposed:
            W = W.t().contiguous()
        return W.to(dtype)


def _find_specs(ck: Checkpoint) -> dict[str, QuantSpec]:
    names = set(ck.names())
    cfg = ck.config if isinstance(ck.config, dict) else {}
    conv1d = CONV1D_LAYERS.get(str(cfg.get("model_type", "")))
    model_dtype = L.NAME_DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or ""), torch.float16)
    specs: dict[str, QuantSpec] = {}
    for name in sorted(names):
        m = _QS.match(name)
        if m:
            w = m.group("w")
            specs[w] = _spec_4bit(ck, names, w, m.group("t"), name, conv1d)
        elif name.endswith(".SCB"):
            module = name[: -len(".SCB")]
            w = module + ".weight"
            specs[w] = _spec_int8(ck, names, w, module, model_dtype, conv1d)
    return specs


def _bad(ck: Checkpoint, name: str, msg: str) -> BadInputError:
    return BadInputError(f"{ck.root}: {name}: {msg}; the bitsandbytes checkpoint is damaged or of an unsupported "
                         f"layout (see formats/bnb-4bit.md)")


def _logical_shape(name: str, stored: tuple[int, ...], conv1d: str | None) -> tuple[int, ...]:
    if conv1d and len(stored) == 2 and re.search(conv1d, name):
        return (stored[1], stored[0])
    return stored


def _spec_4bit(ck: Checkpoint, names: set[str], w: str, qt: str, qs_name: str, conv1d: str | None) -> QuantSpec:
    if w not in names:
        raise _bad(ck, qs_name, f"quant state without its weight {w!r}")
    state = L.parse_qs_json(ck.get(qs_name), f"{ck.root}: {qs_name}")
    if state["quant_type"] != qt:
        raise _bad(ck, qs_name, f"the key says {qt} but the JSON says {state['quant_type']}")
    shape = tuple(state["shape"])
    n = math.prod(shape)
    bs = state["blocksize"]
    nb = -(-n // bs)
    wi = ck.info(w)
    if wi.nbytes != (n + 1) // 2:
        raise _bad(ck, w, f"{wi.nbytes} bytes of packed codes, shape {list(shape)} needs {(n + 1) // 2}")
    aux = {"quant_state": qs_name}
    for a in L.AUX_4BIT:
        if f"{w}.{a}" in names:
            aux[a] = f"{w}.{a}"
    if "absmax" not in aux:
        raise _bad(ck, w, "missing .absmax")
    ai = ck.info(aux["absmax"])
    nested = "nested_absmax" in aux
    if nested != ("nested_offset" in state) or (nested and "nested_quant_map" not in aux):
        raise _bad(ck, w, "double-quantization tensors and quant state disagree")
    if tuple(ai.shape) != (nb,) or ai.dtype != (torch.uint8 if nested else torch.float32):
        raise _bad(ck, aux["absmax"], f"expected {'uint8' if nested else 'float32'} [{nb}], found "
                                      f"{str(ai.dtype).removeprefix('torch.')} {list(ai.shape)}")
    if nested:
        ni, mi = ck.info(aux["nested_absmax"]), ck.info(aux["nested_quant_map"])
        if tuple(ni.shape) != (-(-nb // 256),) or ni.dtype != torch.float32:
            raise _bad(ck, aux["nested_absmax"], f"expected float32 [{-(-nb // 256)}]")
        if tuple(mi.shape) != (256,) or mi.dtype != torch.float32:
            raise _bad(ck, aux["nested_quant_map"], "expected float32 [256]")
    dtype = L.NAME_DTYPES[state["dtype"]]
    return QuantSpec("4bit", w, dtype, _logical_shape(w, shape, conv1d), shape, aux, state)


def _spec_int8(ck: Checkpoint, names: set[str], w: str, module: str, dtype: torch.dtype,
               conv1d: str | None) -> QuantSpec:
    if w not in names:
        raise _bad(ck, module + ".SCB", f"SCB without its weight {w!r}")
    wi, si = ck.info(w), ck.info(module + ".SCB")
    if wi.dtype != torch.int8 or len(wi.shape) != 2:
        raise _bad(ck, w, f"expected a 2-D int8 weight next to SCB, found {str(wi.dtype).removeprefix('torch.')} "
                          f"{list(wi.shape)}")
    if tuple(si.shape) != (wi.shape[0],) or si.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise _bad(ck, module + ".SCB", f"expected float [{wi.shape[0]}]")
    aux = {"SCB": module + ".SCB"}
    fmt = module + ".weight_format"
    if fmt in names:
        aux["weight_format"] = fmt
        v = ck.get(fmt)
        if v.numel() != 1 or int(v.reshape(-1)[0]) != 0:
            got = L.WEIGHT_FORMATS.get(int(v.reshape(-1)[0]) if v.numel() == 1 else -1, "unknown")
            raise _bad(ck, fmt, f"weight format {got!r} is a GPU-tiled layout; only 'row' can be read (reload "
                                f"and save the model with a current bitsandbytes)")
    stored = tuple(wi.shape)
    return QuantSpec("int8", w, dtype, _logical_shape(w, stored, conv1d), stored, aux)
