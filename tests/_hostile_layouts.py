"""Hostile *bases* of the layouts added on 2026-12-05, as data: each case builds a damaged base (and names the
adapter merged into it) in a temporary folder, generated here from small committed fixtures or by the producer
library (gguf-py's GGUFWriter), never downloaded.

* MXFP4 gpt-oss (fixtures/quant/gpt-oss-mxfp4 + its PEFT adapter gpt-oss-lora, which reads every expert
  parameter): scales / blocks shapes that disagree, E8M0 byte 255, truncated tensors, wrong dtypes, a
  config.json lying about shapes;
* fp8 FineGrainedFP8 block (+ ue8m0) and compressed-tensors group / block bases (from the bf16 Llama fixture,
  quantized by loraport's fp8 codecs, which tests/test_fp8_layouts.py checks against the producers): a scale
  grid off by one, zero / NaN / inf scales, group_size 0 / negative / huge / not an int, a scale of the wrong
  dtype;
* ComfyUI-GGUF DiT (the Flux fixture in BFL names, written by GGUFWriter): `comfy.gguf.orig_shape.*` negative,
  huge, of the wrong product, not an int array, 5-D / 6-D, tensors of 6 dimensions, truncated data, an unknown
  tensor type;
* DiT family mismatches: every LoRA fixture of one family against every base fixture of another (diffusers
  folder, single file, ComfyUI-GGUF file), where one of the two is a family added today (Chroma, Lumina2,
  HiDream).

Used by tests/test_hostile_layouts.py (each case through the CLI) and bench/robustness_classes.py (the report's
rows and the fuzz of these bases).

Size: one table of cases per layout plus the builders they share; read as one list of what is tried.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
OSS, OSS_LORA = FIX / "quant" / "gpt-oss-mxfp4", FIX / "quant" / "gpt-oss-lora"
BF16, LLAMA_LORA = FIX / "quant" / "llama-bf16", FIX / "quant" / "lora-small"
DIT = FIX / "dit"
FLUX_LORA = DIT / "flux_kohya.safetensors"
NEW_FAMILIES = ("chroma", "lumina2", "hidream", "flux2", "hunyuan_video", "ltx_video", "ltx2", "zimage")


@dataclass(frozen=True)
class Case:
    layout: str  # "mxfp4" | "fp8" | "gguf-dit" | "family"
    name: str
    build: Callable[[Path], tuple[Path, Path]]  # a fresh folder -> (base, adapter)
    say: tuple[str, ...] = ()  # what the one line must name ("a|b": either)
    expect: str = "error"  # "error", or "any" where a valid merge is right too (a zero scale)

    @property
    def id(self) -> str:
        return f"{self.layout}:{self.name}"


def edit_folder(src: Path, edit: Callable[[dict, dict], None]) -> Callable[[Path], Path]:
    """A copy of the single-shard folder `src` whose tensors and config.json went through `edit`."""
    def make(d: Path) -> Path:
        base = d / "base"
        shutil.copytree(src, base)
        sd = load_file(base / "model.safetensors")
        cfg = json.loads((base / "config.json").read_text())
        edit(sd, cfg)
        save_file(sd, base / "model.safetensors", {"format": "pt"})
        (base / "config.json").write_text(json.dumps(cfg))
        return base
    return make


def _truncate(make: Callable[[Path], Path], keep: Callable[[int], int]) -> Callable[[Path], Path]:
    def cut(d: Path) -> Path:
        base = make(d)
        f = base / "model.safetensors" if base.is_dir() else base
        data = f.read_bytes()
        f.write_bytes(data[: keep(len(data))])
        return base
    return cut


# ------------------------------------------------------------------------------------------------ MXFP4
GU = "model.layers.0.mlp.experts.gate_up_proj"
DN = "model.layers.0.mlp.experts.down_proj"


def _set(k: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict, dict], None]:
    return lambda sd, cfg: sd.__setitem__(k, fn(sd[k]).contiguous())


def _cfg(**kv) -> Callable[[dict, dict], None]:
    return lambda sd, cfg: cfg.update(kv)


def _byte255(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = 255
    return t


MXFP4_EDITS: dict[str, tuple[Callable[[dict, dict], None], tuple[str, ...]]] = {
    "scales one row short": (_set(GU + "_scales", lambda t: t[:, :-1]), ("gate_up_proj_scales", "blocks")),
    "scales one block short": (_set(GU + "_scales", lambda t: t[:, :, :1]), ("gate_up_proj_scales",)),
    "scales with an extra dim": (_set(DN + "_scales", lambda t: t[..., None]), ("down_proj_scales",)),
    "blocks of 15 bytes": (_set(GU + "_blocks", lambda t: t[..., :15]), ("gate_up_proj_blocks",)),
    "blocks 3-D": (_set(DN + "_blocks", lambda t: t.reshape(t.shape[0], t.shape[1], -1)), ("down_proj_blocks",)),
    "zero experts": (_set(GU + "_blocks", lambda t: t[:0]), ("gate_up_proj_blocks",)),
    "E8M0 byte 255 in a merged parameter": (_set(GU + "_scales", _byte255), ("255",)),
    "every scale byte 255": (_set(DN + "_scales", lambda t: torch.full_like(t, 255)), ("255",)),
    "every scale byte 254 (overflows fp32)": (_set(GU + "_scales", lambda t: torch.full_like(t, 254)), ("254",)),
    "blocks stored as int8": (_set(GU + "_blocks", lambda t: t.view(torch.int8)), ("uint8",)),
    "blocks stored as bf16": (_set(DN + "_blocks", lambda t: t.view(torch.bfloat16)), ("uint8",)),
    "scales stored as float32": (_set(GU + "_scales", lambda t: t.float()), ("uint8",)),
    "scales without blocks": (lambda sd, cfg: sd.pop(DN + "_blocks"), ("down_proj_scales",)),
    "blocks without scales": (lambda sd, cfg: sd.pop(GU + "_scales"), ("gate_up_proj_scales",)),
    "stored quantized and plain": (lambda sd, cfg: sd.__setitem__(GU, torch.zeros(2, 64, 64)), (GU,)),
    "config intermediate_size lies": (_cfg(intermediate_size=48), ("intermediate_size",)),
    "config hidden_size lies": (_cfg(hidden_size=96), ("hidden_size",)),
    "config num_local_experts lies": (_cfg(num_local_experts=4), ("num_local_experts",)),
    "config hidden_size 2^62": (_cfg(hidden_size=2**62), ("hidden_size",)),
    "config intermediate_size negative": (_cfg(intermediate_size=-32), ("intermediate_size",)),
    "config says fp8": (lambda sd, cfg: cfg["quantization_config"].update(quant_method="fp8"), ("fp8",)),
    "config quant_method mxfp4, no blocks": (
        lambda sd, cfg: [sd.pop(k) for k in [k for k in sd if k.endswith(("_blocks", "_scales"))]], ("mxfp4",)),
}


def _mxfp4_cases() -> list[Case]:
    cases = [Case("mxfp4", name, lambda d, e=edit: (edit_folder(OSS, e)(d), OSS_LORA), say)
             for name, (edit, say) in MXFP4_EDITS.items()]
    ident = edit_folder(OSS, lambda sd, cfg: None)
    for name, keep in (("truncated in the last tensor", lambda n: n - 100),
                       ("truncated to its header", lambda n: 8 + int.from_bytes(OSS_SHARD_HEAD(), "little")),
                       ("truncated mid-header", lambda n: 40)):
        cases.append(Case("mxfp4", name, lambda d, k=keep: (_truncate(ident, k)(d), OSS_LORA), ("model.safetensors",)))
    return cases


def OSS_SHARD_HEAD() -> bytes:  # noqa: N802 - the safetensors header length, read when a case is built
    with open(OSS / "model.safetensors", "rb") as f:
        return f.read(8)


# ------------------------------------------------------------------------------------------------ fp8
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q = "model.layers.0.self_attn.q_proj.weight_scale"


def _fp8_base(kind: str) -> Callable[[dict, dict], None]:
    """The bf16 Llama's Linears as fp8: `block` (FineGrainedFP8 32×32), `ue8m0` (its power-of-two scales as
    UE8M0 bytes), `group` (compressed-tensors group 32) or `ctblock` (compressed-tensors block 32×32)."""
    from loraport.quant import fp8 as F

    def edit(sd: dict, cfg: dict) -> None:
        for k in [k for k in sd if k.endswith(".weight") and any(f".{m}." in k for m in LINEARS)]:
            W = sd[k].float()
            if kind in ("block", "ue8m0"):
                q, s = F.quantize_block_ue8m0(W, (32, 32)) if kind == "ue8m0" else F.quantize_block(W, (32, 32))
                sd[k], sd[k + "_scale_inv"] = q, F.e8m0_bytes(s) if kind == "ue8m0" else s
            else:
                sd[k], sd[k + "_scale"] = F.quantize_ct_tiles(sd[k], (1, 32) if kind == "group" else (32, 32),
                                                             torch.bfloat16)
        if kind in ("block", "ue8m0"):
            cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                          "weight_block_size": [32, 32],
                                          **({"scale_fmt": "ue8m0"} if kind == "ue8m0" else {})}
            return
        w = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy":
             "group" if kind == "group" else "block",
             **({"group_size": 32} if kind == "group" else {"block_structure": [32, 32]})}
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}
    return edit


def _then(*edits: Callable[[dict, dict], None]) -> Callable[[dict, dict], None]:
    def run(sd: dict, cfg: dict) -> None:
        for e in edits:
            e(sd, cfg)
    return run


def _scale(kind: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict, dict], None]:
    return _set(Q + ("_inv" if kind in ("block", "ue8m0") else ""), fn)


def _fill(v: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[1] = v
        return t
    return f


def _weights_cfg(**kv) -> Callable[[dict, dict], None]:
    return lambda sd, cfg: cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(kv)


def _qc(**kv) -> Callable[[dict, dict], None]:
    return lambda sd, cfg: cfg["quantization_config"].update(kv)


def _fp8_cases() -> list[Case]:
    bad_scales = {"NaN": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
    edits: list[tuple[str, str, Callable[[dict, dict], None], tuple[str, ...], str]] = []
    for kind in ("block", "group", "ctblock"):
        edits += [(kind, "scale grid one row off", _scale(kind, lambda t: torch.cat([t, t[:1]])), ("scale",), "error"),
                  (kind, "scale grid one column short", _scale(kind, lambda t: t[:, :-1]), ("scale",), "error"),
                  (kind, "scale stored as int32", _scale(kind, lambda t: t.to(torch.int32)), ("int32",), "error"),
                  (kind, "scale stored as float64", _scale(kind, lambda t: t.double()), ("float64",), "error"),
                  (kind, "a zero scale", _scale(kind, _fill(0.0)), (), "any")]
        edits += [(kind, f"a {n} scale", _scale(kind, _fill(v)), ("weight_scale",), "error")
                  for n, v in bad_scales.items()]
        edits.append((kind, "a scale of 1e38 (overflows fp32)", _scale(kind, lambda t: torch.full_like(t, 1e38)),
                      ("overflows",), "error"))
    edits += [("ue8m0", "UE8M0 byte 255", _scale("ue8m0", lambda t: _byte255(t.contiguous())), ("255",), "error"),
              ("ue8m0", "scale stored as int8", _scale("ue8m0", lambda t: t.view(torch.int8)), ("int8",), "error"),
              ("ue8m0", "UE8M0 byte 254 (overflows fp32)", _scale("ue8m0", lambda t: torch.full_like(t, 254)),
               ("overflows",), "error")]
    for v in (0, -32, 2**40, "32", 32.5, None):
        edits.append(("group", f"group_size {v!r}", _weights_cfg(group_size=v), ("group_size",), "error"))
    for v in ([0, 32], [-32, 32], [2**40, 2**40], [32], "32x32"):
        edits.append(("ctblock", f"block_structure {v!r}", _weights_cfg(block_structure=v), ("block",), "error"))
    for v in ([0, 32], [32, -1], [2**40, 2**40], [32], ["32", "32"]):
        edits.append(("block", f"weight_block_size {v!r}", _qc(weight_block_size=v), ("weight_block_size",), "error"))
    edits.append(("group", "strategy tensor, group scales", _weights_cfg(strategy="tensor"), ("scale",), "error"))
    return [Case("fp8", f"{kind}: {name}", lambda d, k=kind, e=e: (edit_folder(BF16, _then(_fp8_base(k), e))(d),
                                                                    LLAMA_LORA), say, expect)
            for kind, name, e, say, expect in edits]


# ------------------------------------------------------------------------------------------------ GGUF DiT
RESHAPED = "double_blocks.0.img_mlp.2.weight"  # [16, 64], stored [4, 256]: the kohya fixture LoRA targets it
ORIG = "comfy.gguf.orig_shape." + RESHAPED


def flux_gguf(out: Path, orig=None, extra: dict | None = None, six_d: bool = False, arch: str = "flux") -> Path:
    """The Flux fixture (BFL names) as ComfyUI-GGUF writes it with gguf-py: F32, `RESHAPED` as Q8_0 [4, 256]
    with `comfy.gguf.orig_shape` = `orig` (default: its true shape), a 5-D F32 tensor as fix_5d_tensors.py adds
    (6-D with `six_d`), `extra` metadata as given."""
    import gguf

    sd = load_file(DIT / "flux-bfl.safetensors")
    w = gguf.GGUFWriter(str(out), arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in {ORIG: [16, 64] if orig is None else orig, **(extra or {})}.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif any(isinstance(x, int) and abs(x) >= 2**31 for x in v):
            w.add_key_value(k, v, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT64)
        else:
            w.add_array(k, v)
    for name, t in sd.items():
        a = np.ascontiguousarray(t.float().numpy())
        if name == RESHAPED:
            q = gguf.quants.quantize(a.reshape(-1, 256), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.add_tensor("patch5d.weight", np.ones((2, 1, 2, 2, 2, 2) if six_d else (2, 2, 2, 2, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _patch(make: Callable[[Path], Path], find: bytes, new: bytes, after: int = 0) -> Callable[[Path], Path]:
    """Bytes `new` written over the file at the first `find` (plus `after`)."""
    def p(d: Path) -> Path:
        f = make(d)
        data = bytearray(f.read_bytes())
        at = data.index(find) + after
        data[at:at + len(new)] = new
        f.write_bytes(bytes(data))
        return f
    return p


def _gguf_cases() -> list[Case]:
    def g(**kw) -> Callable[[Path], Path]:
        return lambda d: flux_gguf(d / "base.gguf", **kw)

    good = g()
    tensor_info = RESHAPED.encode() + b"\x02\x00\x00\x00"  # the name, then n_dims (2) as the header stores them
    makers: list[tuple[str, Callable[[Path], Path], tuple[str, ...]]] = [
        ("orig_shape negative", g(orig=[-16, -64]), (ORIG,)),
        ("orig_shape zero dim", g(orig=[0, 1024]), (ORIG,)),
        ("orig_shape huge", g(orig=[2**40, 2**40]), (ORIG,)),
        ("orig_shape product mismatch", g(orig=[16, 63]), (ORIG,)),
        ("orig_shape product overflows int64 to a match", g(orig=[2**62, 2**62, 1024]), (ORIG,)),
        ("orig_shape floats", g(orig=[16.0, 64.0]), (ORIG,)),
        ("orig_shape a string", g(orig="16,64"), (ORIG,)),
        ("orig_shape a scalar", g(orig=1024.0), (ORIG,)),
        ("orig_shape strings", g(orig=["16", "64"]), (ORIG,)),
        ("orig_shape 5-D of the right product", g(orig=[1, 1, 1, 16, 64]), (RESHAPED,)),
        ("orig_shape 6-D of the right product", g(orig=[1, 1, 1, 1, 16, 64]), (RESHAPED,)),
        ("orig_shape 500 dims", g(orig=[1] * 498 + [16, 64]), (RESHAPED,)),
        ("a 6-D tensor", g(six_d=True), ("dimensions",)),
        ("truncated in the tensor data", _truncate(good, lambda n: n - 300), ("base.gguf",)),
        ("truncated in the header", _truncate(good, lambda n: 2000), ("base.gguf",)),
        ("unknown tensor type", _patch(good, tensor_info, (99).to_bytes(4, "little"), len(tensor_info) + 16),
         ("type 99",)),
        ("tensor dims past the file", _patch(good, tensor_info, (2**40).to_bytes(8, "little"), len(tensor_info)),
         ("base.gguf",)),
    ]
    return [Case("gguf-dit", name, lambda d, m=m: (m(d), FLUX_LORA), say) for name, m, say in makers]


DIMS = [0, 1, -1, 2, 4, 16, 64, 256, 1024, 2**31 - 1, 2**32, 2**40, 2**62, -2**63]
ARCHS = ["flux", "chroma", "lumina2", "hidream", "wan", "qwen_image", "llama", "sd3", "", "x" * 300]


def random_flux_gguf(out: Path, ch) -> str:
    """The fuzzer's structural GGUF mutation (`ch`: tests/_hostile_util.Chooser): the Flux GGUF rewritten by
    gguf-py with a random orig_shape (ints of any size and count, floats, a string), a random architecture,
    an orig_shape key on other tensors too, sometimes a 6-D tensor. Returns a description."""
    def shape():
        kind = ch.integer(0, 5)
        if kind == 0:
            return [16, 64]
        if kind == 1:
            return [float(ch.pick(DIMS[:9]))] * ch.integer(1, 3)
        if kind == 2:
            return ",".join(str(ch.pick(DIMS)) for _ in range(2))
        return [ch.pick(DIMS) for _ in range(ch.integer(1, 7))]

    orig, arch, six = shape(), ch.pick(ARCHS), ch.integer(0, 5) == 0
    extra = {f"comfy.gguf.orig_shape.{ch.pick(['img_in.bias', 'final_layer.linear.weight', 'patch5d.weight'])}":
             shape() for _ in range(ch.integer(0, 2))}
    flux_gguf(out, orig=orig, extra=extra, six_d=six, arch=arch)
    return f"gguf: orig_shape {str(orig)[:40]}, arch {arch[:12]!r}, extra {str(extra)[:60]}, 6-D {six}"


# ------------------------------------------------------------------------------------------------ families
FAMILY_NAMES = {"flux": "Flux", "sd3": "SD3", "wan": "Wan", "qwen": "Qwen-Image", "chroma": "Chroma",
                "lumina2": "Lumina", "hidream": "HiDream", "flux2": "Flux.2", "hunyuan_video": "HunyuanVideo",
                "ltx_video": "LTX-Video", "ltx2": "LTX-2", "zimage": "Z-Image"}
# fixture file prefix → family name (a FramePack base is HunyuanVideo's transformer plus two modules)
FIXTURE_FAMILY = {"hunyuan": "hunyuan_video", "framepack": "hunyuan_video", "ltx": "ltx_video"}


def _family(p: Path) -> str:
    stem = p.name.split("_")[0].split("-")[0]
    return FIXTURE_FAMILY.get(stem, stem)


@functools.cache
def _fits(lo: Path) -> frozenset[str]:
    """The families whose tables know the LoRA's modules best (one, or several alike: a diffusers Flux.1 LoRA on
    its blocks is HunyuanVideo's names too; a kohya one Flux.2's). A base of one of them is no mismatch by names:
    it merges where the shapes fit, else a shape line (formats/dit.md, "Refused")."""
    from loraport.api import inspect

    fam = inspect(lo).report.get("family") or {}
    return frozenset([fam.get("family"), *fam.get("also_fits", ())]) - {None}


def family_pairs() -> list[tuple[Path, Path]]:
    """(LoRA, base) fixture pairs of different families where one is new, kin pairs (a Flux-named LoRA on
    Chroma, whose modules are Flux's) left out: those merge when every module is there."""
    from loraport.names import dit

    bases = sorted(p for p in DIT.iterdir() if p.name.endswith(("-diffusers", "-original.safetensors",
                                                               "-bfl.safetensors")))
    loras = sorted(p for p in DIT.glob("*_*.safetensors") if not p.name.startswith("expect"))
    return [(lo, b) for lo in loras for b in bases if _family(lo) != _family(b)
            and {_family(lo), _family(b)} & set(NEW_FAMILIES) and not dit.kin(_family(lo), _family(b))
            and _family(b) not in _fits(lo)]


def always_fits(lora_family: str, base_family: str) -> bool:
    """Every fixture LoRA of `lora_family` fits `base_family`'s table by its names (LTX-Video's on LTX-2, whose
    video stream has LTX-Video's names): no name mismatch there, the shapes decide."""
    loras = [p for p in DIT.glob("*_*.safetensors") if not p.name.startswith("expect") and _family(p) == lora_family]
    return bool(loras) and all(base_family in _fits(lo) for lo in loras)


GGUF_ARCHS = {"flux": "flux-bfl", "chroma": "chroma-original", "lumina2": "lumina2-original", "wan": "wan-original"}


def dit_gguf(family: str, out: Path) -> Path:
    """A family's original single file as a ComfyUI-GGUF base (F32 tensors, general.architecture = family)."""
    import gguf

    w = gguf.GGUFWriter(str(out), family)
    for k, t in load_file(DIT / f"{GGUF_ARCHS[family]}.safetensors").items():
        w.add_tensor(k.removeprefix("model.diffusion_model."), np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def gguf_family_pairs() -> list[tuple[Path, str]]:
    """(LoRA, GGUF base family) of different families where one is new (kin pairs left out, as above)."""
    from loraport.names import dit

    loras = sorted(p for p in DIT.glob("*_*.safetensors") if not p.name.startswith("expect"))
    return [(lo, f) for lo in loras for f in GGUF_ARCHS if _family(lo) != f
            and {_family(lo), f} & set(NEW_FAMILIES) and not dit.kin(_family(lo), f) and f not in _fits(lo)]


def _family_cases() -> list[Case]:
    def said(lo: Path) -> str:  # a Chroma LoRA in kohya names is spelled as Flux's: it may be told as Flux
        return "Chroma|Flux" if _family(lo) == "chroma" else FAMILY_NAMES[_family(lo)]

    out = [Case("family", f"{lo.name} -> {b.name}", lambda d, lo=lo, b=b: (b, lo), (said(lo), FAMILY_NAMES[
        _family(b)])) for lo, b in family_pairs()]
    out += [Case("family", f"{lo.name} -> {f}.gguf", lambda d, lo=lo, f=f: (dit_gguf(f, d / f"{f}.gguf"), lo),
                 (said(lo), FAMILY_NAMES[f])) for lo, f in gguf_family_pairs()]
    return out


def cases() -> list[Case]:
    return _mxfp4_cases() + _fp8_cases() + _gguf_cases() + _family_cases()


def out_path(base: Path, d: Path) -> Path:
    """Where a merge of `base` writes: a folder for a folder, the same suffix for a single file."""
    return d / ("merged" if base.is_dir() else "merged" + base.suffix)


# ------------------------------------------------------------------------------------------------ fuzz seeds
SEEDS: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    "mxfp4": lambda d: (edit_folder(OSS, lambda sd, cfg: None)(d), OSS_LORA),
    **{f"fp8-{k}": (lambda d, k=k: (edit_folder(BF16, _fp8_base(k))(d), LLAMA_LORA))
       for k in ("block", "ue8m0", "group", "ctblock")},
    "gguf-dit": lambda d: (flux_gguf(d / "base.gguf"), FLUX_LORA),
}  # the undamaged bases the fuzzer mutates (each merges cleanly: tests/test_hostile_layouts.py checks it)
