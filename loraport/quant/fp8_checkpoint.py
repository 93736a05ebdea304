"""An fp8 base seen as an ordinary base (the fp8 source): every float8 weight is served dequantized in fp32,
its scales and markers hidden, so the plan and the merge see plain float tensors (spec: formats/fp8.md).

Layouts, told apart per weight by the tensors next to it (`<m>.weight` is float8_e4m3fn or float8_e5m2):

    <m>.weight_scale_inv  fp32 [⌈out/bm⌉, ⌈in/bn⌉]   block   (config quant_method "fp8": DeepSeek-V3, Qwen3-FP8;
                                                    scale_fmt "ue8m0": powers of two, fp32 or uint8 bytes)
    <m>.weight_scale      [1] / [out, 1] / [out, in/g] / [⌈out/bh⌉, ⌈in/bw⌉]
                                                    tensor / channel / group / block (quant_method
                                                    "compressed-tensors"; the config groups give g, bh×bw)
    <m>.scale_weight      [] / [1] or [out]         scaled  (ComfyUI; the file holds a `scaled_fp8` marker)
    nothing                                         plain   (Flux / Wan fp8 single files)

`input_scale` / `scale_input` tensors (static activation scales) ride along with their weight: copied as they
are into an fp8 output, dropped from a 16-bit one. `Fp8Checkpoint.own_layout()` is the sink that writes the
same layout back (loraport.quant.fp8_quantizer).
"""

from __future__ import annotations

import torch

from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError
from loraport.quant import fp8 as F
from loraport.quant.fp8_spec import MARKER, Fp8Spec
from loraport.quant.dequant_view import DequantizedView

METHODS = ("fp8", "compressed-tensors")  # the config.json quant_method values this source reads
_SCALES = {"block": "weight_scale_inv", "ct": "weight_scale", "scaled": "scale_weight"}
_INPUT_SCALES = ("input_scale", "scale_input")


def quant_config(config) -> dict | None:
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc if isinstance(qc, dict) else None


def has_fp8(ck: Checkpoint) -> bool:
    """A base this source claims: an fp8 quant_method in config.json, or any float8 tensor."""
    qc = quant_config(ck.config)
    if qc is not None and qc.get("quant_method") in METHODS:
        return True
    return any(F.is_fp8(ck.info(n).dtype) for n in ck.names())


def _bad(ck: Checkpoint, name: str, msg: str) -> BadInputError:
    return BadInputError(f"{ck.root}: {name}: {msg}; the fp8 checkpoint is damaged or of an unsupported layout "
                         f"(see formats/fp8.md)")


_CT_STRATEGIES = ("tensor", "channel", "group", "block")


def _ct_tile(ck: Checkpoint, g: str, w: dict) -> tuple[str, tuple[int, int] | None]:
    """(kind, tile) of a compressed-tensors weight scheme (tile None for tensor / channel)."""
    if w.get("strategy") == "group":
        gs = w.get("group_size")
        if not (isinstance(gs, int) and gs > 0):
            raise BadInputError(f"{ck.root}/config.json: compressed-tensors group {g!r}: strategy 'group' needs a "
                                f"positive integer group_size, found {gs!r}")
        return "group", (1, gs)
    if w.get("strategy") == "block":
        bs = w.get("block_structure")
        if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
            raise BadInputError(f"{ck.root}/config.json: compressed-tensors group {g!r}: strategy 'block' needs "
                                f"block_structure [rows, cols], found {bs!r}")
        return "ct-block", (bs[0], bs[1])
    return w["strategy"], None


def _ct_check(ck: Checkpoint, qc: dict) -> list[tuple[str, tuple[int, int] | None]]:
    """compressed-tensors: only the float-quantized fp8 weight schemes are read; returns the strategies (with
    the group / block tiles) its config groups declare (a weight's scale shape picks one)."""
    fmt = qc.get("format")
    if fmt not in ("float-quantized", None):
        raise BadInputError(f"{ck.root}: compressed-tensors format {fmt!r} is not supported as a base (only "
                            f"'float-quantized' fp8 weights are); dequantize it with llm-compressor first")
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    tiles = []
    for g, grp in groups.items():
        w = grp.get("weights") if isinstance(grp, dict) else None
        if not isinstance(w, dict):
            continue
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in _CT_STRATEGIES:
            raise BadInputError(f"{ck.root}: compressed-tensors group {g!r} stores {w.get('type')} "
                                f"{w.get('num_bits')}-bit weights with strategy {w.get('strategy')!r}; only fp8 "
                                f"with strategy {', '.join(_CT_STRATEGIES)} is supported as a base")
        tiles.append(_ct_tile(ck, g, w))
    return tiles


def _block_size(ck: Checkpoint, qc: dict | None) -> tuple[int, int]:
    bs = (qc or {}).get("weight_block_size", [128, 128])
    if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
        raise BadInputError(f"{ck.root}/config.json: quantization_config.weight_block_size {bs!r} is not two "
                            f"positive integers")
    return bs[0], bs[1]


def find_specs(ck: Checkpoint) -> dict[str, Fp8Spec]:
    names = set(ck.names())
    qc = quant_config(ck.config)
    method = qc.get("quant_method") if qc else None
    tiles = _ct_check(ck, qc) if method == "compressed-tensors" else []
    block = _block_size(ck, qc) if method == "fp8" else (128, 128)
    ue8m0 = method == "fp8" and qc.get("scale_fmt") == "ue8m0"
    marker = next((n for n in ck.names() if n == MARKER or n.endswith("." + MARKER)), None)
    specs: dict[str, Fp8Spec] = {}
    for name in ck.names():
        info = ck.info(name)
        if name == marker or not F.is_fp8(info.dtype):
            continue
        specs[name] = _spec(ck, names, name, tuple(info.shape), info.dtype, block)
        if specs[name].kind == "block":
            _block_fmt(ck, specs[name], ue8m0)
        elif specs[name].kind == "ct":
            _ct_kind(ck, specs[name], tiles)
    for name in names:  # a scale whose weight is not fp8 would be silently ignored: refuse it
        for suffix in _SCALES.values():
            if name.endswith("." + suffix):
                w = name[: -len(suffix)] + "weight"
                if w not in specs:
                    raise _bad(ck, name, f"a {suffix} without an fp8 weight {w!r}")
    if method in METHODS and not specs:
        raise BadInputError(f"{ck.root}: config.json says quant_method {method!r} but no weight is stored as "
                            f"float8; remove quantization_config from config.json or use the fp8 checkpoint")
    if marker is not None and specs:
        first = next((s for s in specs.values() if s.kind == "scaled"), None)
        if first is not None:
            first.aux["marker"] = marker
    return specs


def _spec(ck: Checkpoint, names: set[str], name: str, shape: tuple[int, ...], fp8: torch.dtype,
          block: tuple[int, int]) -> Fp8Spec:
    stem = name[: -len("weight")] if name.endswith(".weight") else None
    found = [k for k, s in _SCALES.items() if stem and stem + s in names]
    if len(found) > 1:
        raise _bad(ck, name, f"has scales of two layouts ({', '.join(_SCALES[k] for k in found)})")
    spec = Fp8Spec("plain", name, fp8, shape)
    for a in _INPUT_SCALES:
        if stem and stem + a in names:
            spec.aux["input_scale"] = stem + a
    if not found:
        return spec
    kind = found[0]
    sname = stem + _SCALES[kind]
    si = ck.info(sname)
    spec.aux["scale"], spec.scale_dtype, spec.scale_shape = sname, si.dtype, tuple(si.shape)
    if si.dtype not in (torch.float32, torch.float16, torch.bfloat16) and not (kind == "block" and
                                                                              si.dtype == torch.uint8):
        raise _bad(ck, sname, f"scale stored as {str(si.dtype).removeprefix('torch.')}, expected a float dtype "
                              f"(or uint8 UE8M0 bytes for block scales)")
    rows = shape[0] if shape else 1
    if kind == "block":
        if len(shape) != 2:
            raise _bad(ck, name, f"a block-scaled weight must be 2-D, found {list(shape)}")
        if spec.scale_shape != F.block_grid(shape, block):
            grid = list(F.block_grid(shape, block))
            raise _bad(ck, sname, f"scale shape {list(si.shape)} does not match weight {list(shape)} in "
                                  f"weight_block_size {block[0]}×{block[1]} blocks (expected {grid})")
        spec.kind, spec.block = "block", block
    elif kind == "ct":
        spec.kind = "ct"  # tensor / channel / group / ct-block: told by _ct_kind from the scale's shape
    else:
        n = 1
        for d in spec.scale_shape:
            n *= d
        if not (n == 1 or (len(shape) >= 2 and spec.scale_shape in ((rows,), (rows, 1)))):
            raise _bad(ck, sname, f"scale shape {list(si.shape)} is neither one value nor one per row of "
                                  f"weight {list(shape)}")
        spec.kind = "scaled"
    return spec


def _block_fmt(ck: Checkpoint, spec: Fp8Spec, ue8m0: bool) -> None:
    """Power-of-two block scales: config.json's scale_fmt "ue8m0" (fp32 scales) or UE8M0 bytes (uint8)."""
    spec.ue8m0 = ue8m0 or spec.scale_dtype == torch.uint8


def _ct_kind(ck: Checkpoint, spec: Fp8Spec, tiles: list[tuple[str, tuple[int, int] | None]]) -> None:
    """A compressed-tensors weight's strategy, from its scale's shape: [1] tensor, [out, 1] channel, else the
    group / block tile of a config group whose scale grid it is. Where the config declares its strategies only
    those are taken: a group scale that lost columns down to [out, 1] is not read as per-channel."""
    shape, ss = spec.shape, spec.scale_shape
    rows = shape[0] if shape else 1
    declared = {k for k, _ in tiles}
    if ss in ((), (1,)) and (not declared or "tensor" in declared):
        spec.kind = "tensor"
        return
    if len(shape) == 2 and ss in ((rows, 1), (rows,)) and (not declared or "channel" in declared):
        spec.kind = "channel"
        return
    for kind, tile in tiles:
        if tile is not None and len(shape) == 2 and ss == F.block_grid(shape, tile):
            spec.kind, spec.block = kind, tile
            return
    raise _bad(ck, spec.aux["scale"], f"scale shape {list(ss)} is none of {_ct_wanted(shape, tiles)} for weight "
                                      f"{list(shape)}")


def _ct_wanted(shape: tuple[int, ...], tiles: list[tuple[str, tuple[int, int] | None]]) -> str:
    """The scale shapes a weight of `shape` may have under the config's strategies, each with its config field."""
    declared = {k for k, _ in tiles}
    want = [] if declared and "tensor" not in declared else ["per-tensor [1]"]
    if not declared or "channel" in declared:
        want.append(f"per-channel [{shape[0] if shape else 1}, 1]")
    for k, t in tiles:
        if t is not None and len(shape) == 2:
            field = f"group_size {t[1]}" if k == "group" else f"block_structure {list(t)}"
            want.append(f"{k} {list(F.block_grid(shape, t))} (config {field})")
    return " / ".join(want)


def _finite_scale(ck: Checkpoint, name: str) -> torch.Tensor:
    """A stored scale, refused when it is no number (checked as read: scales are a small part of the bytes): a
    NaN / inf scale (or UE8M0 byte 255) would reach the output as NaN weights, blamed on the adapter."""
    s = ck.get(name)
    if s.dtype == torch.uint8 and bool((s == 255).any()):
        raise _bad(ck, name, "holds UE8M0 byte 255 (NaN)")
    if s.dtype != torch.uint8 and not bool(torch.isfinite(s).all()):
        raise _bad(ck, name, "holds a NaN or infinite scale")
    return s


def dequantize(ck: Checkpoint, spec: Fp8Spec) -> torch.Tensor:
    """The fp32 weight a consumer computes with (before its own rounding to the compute dtype)."""
    q = ck.get(spec.weight)
    if spec.kind == "plain":
        return F.dequantize_plain(q)
    s = _finite_scale(ck, spec.aux["scale"])
    s = F.e8m0_float(s) if s.dtype == torch.uint8 else s
    W = _scaled(q, s, spec)
    # a finite scale so large that codes × scale leave fp32 (a scale past ~7.6e35 for e4m3): inf weights, which
    # a 16-bit output would carry silently and an fp8 one blame on the adapter; checked only when it can happen
    if s.numel() and float(s.float().abs().max()) * F.fp8_max(spec.fp8) > torch.finfo(torch.float32).max and \
            not bool(torch.isfinite(W).all()):
        raise _bad(ck, spec.aux["scale"], "holds a scale so large that the weight overflows fp32 (inf)")
    return W


def _scaled(q: torch.Tensor, s: torch.Tensor, spec: Fp8Spec) -> torch.Tensor:
    if spec.tiled:
        return F.dequantize_block(q, s, spec.block)
    if spec.kind == "scaled":
        return F.dequantize_scaled(q, s)
    return F.dequantize_ct(q, s)


class Fp8Checkpoint(DequantizedView):
    """A Checkpoint whose float8 weights are served dequantized in fp32 (see the module docstring)."""

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> Fp8Checkpoint:
        specs = find_specs(ck)
        self = cls._view(ck, specs)  # a 16-bit output drops quantization_config
        return self

    def is_quantized(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str) -> torch.Tensor:
        spec = self.specs.get(name)
        return super().get(name) if spec is None else dequantize(self.stored, spec)

    def get32(self, name: str) -> torch.Tensor:
        return self.get(name).to(torch.float32)

    def raw(self, name: str) -> memoryview:
        sh, key = self.shard_of(name)
        return sh.file.raw(key)

    def storage_of(self, name: str) -> str:
        s = self.specs.get(name)
        if s is None:
            return super().storage_of(name)
        fp8 = str(s.fp8).removeprefix("torch.")
        if s.kind == "plain":
            return f"{fp8} (plain)"
        sdt = str(s.scale_dtype).removeprefix("torch.")
        tile = f"{s.block[0]}x{s.block[1]}" if s.block else ""
        what = {"block": f"{tile} block scales{' (ue8m0)' if s.ue8m0 else ''}", "tensor": "per-tensor scale",
                "channel": "per-channel scale", "scaled": "ComfyUI scale_weight",
                "group": f"group-{s.block[1] if s.block else 0} scales", "ct-block": f"{tile} block scales"}[s.kind]
        return f"{fp8} + {sdt} {what}"

    def own_layout(self):
        """The sink quantizer that writes this base's fp8 layout back (the default output of a merge)."""
        from loraport.quant.fp8_quantizer import Fp8Quantizer

        return Fp8Quantizer(source=self)

    def close(self) -> None:
        self.stored.close()
