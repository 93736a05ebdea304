"""kohya-ss / sd-scripts single-file LoRA as read by A1111 and ComfyUI (`lora_unet_…`, `lora_te_…`,
`lora_te1_/te2_…` with `.lora_down/.lora_up/.alpha`, LoCon convs, Tucker `lora_mid`, `dora_scale`).
Spec: formats/kohya.md.

The same single-file layout carries the LyCORIS algorithms (`hada_*`, `lokr_*`, IA³, full diffs); this module
holds the parser for all of them and `formats/lycoris.py` registers the LyCORIS face of it. Module names are
matched *forward*: every base tensor's kohya names are built from the base (loraport.names.sd) and looked up.

Size: one parser for the kohya single-file layout and every LyCORIS algorithm it carries (formats/lycoris.py
reuses it); `make_deltas` and `write_single_file` are on tests/c901_allowlist.txt.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from loraport.adapter import Adapter, Delta, FullDelta, LoraDelta
from loraport.deltas_lycoris import Ia3Delta, LohaDelta, LokrDelta
from loraport.errors import BadInputError
from loraport.formats._common import check_unmatched, lora_scale
from loraport.formats._dit import DitNames, DitReadOptions
from loraport.formats._dit_write import kohya_modules
from loraport.formats import AdapterFormat, ReadOptions, WriteOptions, choice, register
from loraport.names.lycoris_wrapper import ROOTS, WrapperNames, is_wrapper_module, wrapper_index
from loraport.names.sd import KNOWN_PREFIXES, Entry, SDNames, kohya_name, te_spellings
from loraport.safetensors_io import SafetensorsFile, save_file
from loraport.tensorfile import load_tensors

# suffix after "<module>." → role
LORA_KEYS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
             "lora_A.weight": "down", "lora_B.weight": "up"}  # A1111 also accepts PEFT spellings
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
IA3_KEYS = ("weight", "on_input")
FULL_KEYS = ("diff", "diff_b")
COMMON_KEYS = ("alpha", "dora_scale", "scale")  # `scale`: A1111's absolute per-module scale
KNOWN_SUFFIXES = set(LORA_KEYS) | set(LOHA_KEYS) | set(LOKR_KEYS) | set(IA3_KEYS) | set(FULL_KEYS) | set(COMMON_KEYS)
LYCORIS_ONLY = set(LOHA_KEYS) | set(LOKR_KEYS) | {"on_input", "diff", "diff_b"}
LYCORIS_EPS = float(torch.finfo(torch.float32).eps)  # LyCORIS adds eps(dtype) to the DoRA norm


# ComfyUI's generic keys: `diffusion_model.<module path of the model file>` + a LoRA / LyCORIS tensor suffix
# (comfy/lora.py maps every base tensor so). PEFT's lora_A/lora_B there are the diffusers format's `comfy`
# dialect; `weight` (IA³) and `scale` (A1111) would make a model file's own keys look like an adapter.
DOTTED_PREFIXES = ("diffusion_model.",)
WRAPPER_ROOTS = {prefix for prefix, _, _ in ROOTS}
_BY_LENGTH = sorted(KNOWN_SUFFIXES - {"lora_A.weight", "lora_B.weight", "weight", "on_input", "scale"}, key=len,
                    reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x_to_q.lora_down.weight' → ('lora_unet_x_to_q', 'lora_down.weight'), None if not kohya-like.
    A dotted module under a DOTTED_PREFIXES prefix keeps its dots: the longest known suffix ends it."""
    if key.startswith(DOTTED_PREFIXES):
        suffix = next((s for s in _BY_LENGTH if key.endswith("." + s)), None)
        mod = key[: -len(suffix) - 1] if suffix else ""
        if not suffix or "." not in mod or "lora" in mod.rsplit(".", 1)[1]:  # `x.lora_A.alpha`-like: PEFT's
            return None
        return mod, suffix
    mod, dot, suffix = key.partition(".")
    if not dot or not mod.startswith(KNOWN_PREFIXES) or suffix not in KNOWN_SUFFIXES:
        return None
    return mod, suffix


def header_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file without reading its data; [] if it is not one."""
    if not path.is_file() or path.suffix != ".safetensors":
        return []
    try:
        f = SafetensorsFile(path)
    except BadInputError:
        return []
    try:
        return list(f.tensors)
    finally:
        f.close()


def kind_of(parts: dict[str, torch.Tensor]) -> str | None:
    if any(k.startswith("hada_") for k in parts):
        return "loha"
    if any(k.startswith("lokr_") for k in parts):
        return "lokr"
    if "down" in parts or "up" in parts:
        return "lora"
    if "diff" in parts or "diff_b" in parts:
        return "full"
    if "weight" in parts:
        return "ia3"
    return None


# ------------------------------------------------------------------------------------------------ build deltas
def _dora(ds: torch.Tensor | None, out: int, inp: int, where: str, notes: set[str]) -> tuple:
    """(magnitude, axis) from a `dora_scale` tensor: [out,1,...] → output axis, [1,in,...] → input axis."""
    if ds is None:
        return None, "out"
    s = tuple(ds.shape)
    if len(s) >= 2 and s[0] == out and all(x == 1 for x in s[1:]) and not (out == 1 and s[1] == inp):
        notes.add("DoRA on the output axis (dora_scale [out,1])")
        return ds.reshape(-1), "out"
    flat_in = len(s) > 2 and inp % s[1] == 0  # conv factors flatten the kernel into the input axis
    if len(s) >= 2 and s[0] == 1 and (s[1] == inp or flat_in) and all(x == 1 for x in s[2:]):
        notes.add("DoRA on the input axis (dora_scale [1,in], LyCORIS < 3.2 / kohya)")
        return ds.reshape(-1), "in"
    if len(s) == 1 and s[0] in (out, inp):
        axis = "out" if s[0] == out else "in"
        notes.add("DoRA magnitude 1-D: " + ("ambiguous (square layer), output axis assumed" if out == inp
                                             else f"{axis}put axis"))
        return ds, axis
    raise BadInputError(f"{where}: dora_scale {list(s)} fits neither the output ({out}) nor the input ({inp}) axis")


def _number(t: torch.Tensor, where: str, what: str) -> float:
    v = float(t.float().reshape(-1)[0]) if t.numel() == 1 else float("nan")
    if not math.isfinite(v):
        got = f"{list(t.shape)} {t.reshape(-1)[:2].tolist()}"
        raise BadInputError(f"{where}: {what} must be one finite number, got {got}")
    return v


def _scale(parts: dict, r: int | None, notes_count: dict, where: str = "") -> tuple[float, float | None]:
    if "scale" in parts:
        return _number(parts["scale"], where, "scale"), None
    a = parts.get("alpha")
    if a is None or r is None:
        notes_count["alpha"] += 1
        return 1.0, None
    alpha = _number(a, where, "alpha")
    if alpha == 0:  # sd-scripts and LyCORIS: alpha 0 or None means alpha = rank
        return 1.0, float(r)
    return lora_scale(alpha, r), alpha


def _check_factors(where: str, parts: dict[str, torch.Tensor]) -> None:
    for k, t in parts.items():
        if k in ("alpha", "on_input", "scale"):
            continue
        if not t.is_floating_point():
            raise BadInputError(f"{where}: {k} is {str(t.dtype).replace('torch.', '')}, not a float tensor")
        if t.numel() == 0 or t.dim() > 5:  # 5-D: a Conv3d (Wan's patch embedding)
            raise BadInputError(f"{where}: {k} has an unusable shape {list(t.shape)}")


def _mm_fits(where: str, a: torch.Tensor, b: torch.Tensor, an: str, bn: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise BadInputError(f"{where}: {an} {list(a.shape)} and {bn} {list(b.shape)} do not multiply")


def _tucker_fits(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """core t [r, r, kh, kw] with a [r, out], b [r, in]"""
    return a.dim() == b.dim() == 2 and t.dim() >= 2 and t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0]


def _lora_deltas(where: str, parts: dict[str, torch.Tensor], tgt: str, transpose: bool, common: dict,
                 notes: set[str], counts: dict, mod: str, ent_w: Entry | None, ent_b: Entry | None) -> list[Delta]:
    """LoRA / LoCon (lora_down, lora_up, optional Tucker lora_mid), with DoRA's dora_scale."""
    A, B = parts.get("down"), parts.get("up")
    if A is None or B is None:
        raise BadInputError(f"{where}: has only one of lora_down/lora_up")
    mid = parts.get("mid")
    r = int(A.shape[0])
    if B.dim() < 2 or (B.shape[1] != r and mid is None) or A.dim() not in (2, 4, 5) or B.dim() not in (2, 4, 5):
        raise BadInputError(f"{where}: lora_down {list(A.shape)} and lora_up {list(B.shape)} do not fit")
    scale, alpha = _scale(parts, r, counts, where)
    inp = int(A.shape[1])
    mag, axis = _dora(parts.get("dora_scale"), int(B.shape[0]), inp, where, notes)
    if mid is not None:
        notes.add("Tucker conv (lora_mid)")
    return [LoraDelta(tgt, A=A, B=B, mid=mid, scale=scale, alpha=alpha, transpose=transpose,
                      magnitude=mag, dora_axis=axis, dora_eps=LYCORIS_EPS if mag is not None else 0.0,
                      **common)]


def _loha_deltas(where: str, parts: dict[str, torch.Tensor], tgt: str, transpose: bool, common: dict,
                 notes: set[str], counts: dict, mod: str, ent_w: Entry | None, ent_b: Entry | None) -> list[Delta]:
    """LoHa: two Hadamard-multiplied low-rank products (optional Tucker cores)."""
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if any(k not in parts for k in need) or (("hada_t1" in parts) != ("hada_t2" in parts)):
        raise BadInputError(f"{where}: LoHa needs {', '.join(need)} (and both or neither of hada_t1/t2)")
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    for n in ("1", "2"):
        a, b, t = parts[f"hada_w{n}_a"], parts[f"hada_w{n}_b"], parts.get(f"hada_t{n}")
        if t is None:
            _mm_fits(where, a, b, f"hada_w{n}_a", f"hada_w{n}_b")
        elif not _tucker_fits(t, a, b):
            raise BadInputError(f"{where}: hada_t{n} {list(t.shape)} does not fit hada_w{n}_a/b")
    p1 = (parts["hada_w1_a"].shape, parts["hada_w1_b"].shape)
    if (p1[0][1 if t1 is not None else 0], p1[1][1]) != (parts["hada_w2_a"].shape[1 if t2 is not None else 0],
                                                         parts["hada_w2_b"].shape[1]):
        raise BadInputError(f"{where}: the two Hadamard factors have different shapes")
    r = int(parts["hada_w1_b"].shape[0])
    scale, alpha = _scale(parts, r, counts, where)
    d = LohaDelta(tgt, w1a=parts["hada_w1_a"], w1b=parts["hada_w1_b"], w2a=parts["hada_w2_a"],
                  w2b=parts["hada_w2_b"], t1=parts.get("hada_t1"), t2=parts.get("hada_t2"), scale=scale,
                  alpha=alpha, transpose=transpose, **common)
    return [_with_dora(d, parts, where, notes)]


def _with_dora(d: Delta, parts: dict[str, torch.Tensor], where: str, notes: set[str]) -> Delta:
    """A LoHa / LoKr delta with its file's dora_scale (if any) attached, checked against the product's shape."""
    out, inp = d._product_shape()[:2]
    d.magnitude, d.dora_axis = _dora(parts.get("dora_scale"), out, inp, where, notes)
    d.dora_eps = LYCORIS_EPS
    return d


def _lokr_deltas(where: str, parts: dict[str, torch.Tensor], tgt: str, transpose: bool, common: dict,
                 notes: set[str], counts: dict, mod: str, ent_w: Entry | None, ent_b: Entry | None) -> list[Delta]:
    """LoKr: a Kronecker product of w1 and w2, each full or factored (w2 optionally Tucker)."""
    full1, full2 = "lokr_w1" in parts, "lokr_w2" in parts
    if not full1 and "lokr_w1_a" in parts and "lokr_w1_b" in parts:
        _mm_fits(where, parts["lokr_w1_a"], parts["lokr_w1_b"], "lokr_w1_a", "lokr_w1_b")
    if not full2 and "lokr_w2_a" in parts and "lokr_w2_b" in parts:
        a, b, t = parts["lokr_w2_a"], parts["lokr_w2_b"], parts.get("lokr_t2")
        if t is None:
            _mm_fits(where, a, b, "lokr_w2_a", "lokr_w2_b")
        elif not _tucker_fits(t, a, b):
            raise BadInputError(f"{where}: lokr_t2 {list(t.shape)} does not fit lokr_w2_a/b")
    if full1 and parts["lokr_w1"].dim() != 2:
        raise BadInputError(f"{where}: lokr_w1 {list(parts['lokr_w1'].shape)} is not a matrix")
    r = None
    if not full2 and "lokr_w2_b" in parts:
        r = int(parts["lokr_w2_b"].shape[0])
    elif not full1 and "lokr_w1_b" in parts:
        r = int(parts["lokr_w1_b"].shape[0])
    if full1 and full2:
        notes.add("LoKr with full w1 and w2: scale 1 (LyCORIS ignores alpha there)")
        scale, alpha = 1.0, None
    else:
        scale, alpha = _scale(parts, r, counts, where)
    try:
        d = LokrDelta(tgt, w1=parts.get("lokr_w1"), w1a=parts.get("lokr_w1_a"), w1b=parts.get("lokr_w1_b"),
                      w2=parts.get("lokr_w2"), w2a=parts.get("lokr_w2_a"), w2b=parts.get("lokr_w2_b"),
                      t2=parts.get("lokr_t2"), scale=scale, alpha=alpha, transpose=transpose, **common)
    except Exception as e:  # PlanError from the factor check
        raise BadInputError(f"{where}: {e}") from None
    return [_with_dora(d, parts, where, notes)]


def _full_deltas(where: str, parts: dict[str, torch.Tensor], tgt: str, transpose: bool, common: dict,
                 notes: set[str], counts: dict, mod: str, ent_w: Entry | None, ent_b: Entry | None) -> list[Delta]:
    """full / diff: a dense difference for the weight (diff) and the bias (diff_b)."""
    ds: list[Delta] = []
    if "diff" in parts:
        ds.append(FullDelta(tgt, diff=parts["diff"], **common))
    if "diff_b" in parts:
        if ent_w is not None and ent_b is None:
            raise BadInputError(f"{where}: diff_b given but the base has no bias for this module")
        btgt = ent_b.target if ent_b else f"{mod}.bias"
        ds.append(FullDelta(btgt, diff=parts["diff_b"], rows=ent_b.rows if ent_b else None,
                            source_key=mod + ".diff_b"))
    return ds


def _ia3_deltas(where: str, parts: dict[str, torch.Tensor], tgt: str, transpose: bool, common: dict,
                notes: set[str], counts: dict, mod: str, ent_w: Entry | None, ent_b: Entry | None) -> list[Delta]:
    """IA³: a learned channel scale on the output (or input) features."""
    on_input = False
    if "on_input" in parts:
        flag = _number(parts["on_input"], where, "on_input")
        if flag not in (0.0, 1.0):
            raise BadInputError(f"{where}: on_input must be 0 or 1, got {flag}")
        on_input = flag == 1.0
    if parts["weight"].dim() not in (1, 4) or parts["weight"].numel() == 0:
        raise BadInputError(f"{where}: IA³ weight {list(parts['weight'].shape)} is not a channel vector")
    return [Ia3Delta(tgt, vector=parts["weight"].reshape(-1), on_input=on_input, **common)]


# kind_of(parts) → the function that checks that kind's factors and builds its delta(s)
_MAKERS = {"lora": _lora_deltas, "loha": _loha_deltas, "lokr": _lokr_deltas, "full": _full_deltas,
           "ia3": _ia3_deltas}


def make_deltas(mod: str, parts: dict[str, torch.Tensor], ent_w: Entry | None, ent_b: Entry | None,
                path: Path, notes: set[str], counts: dict) -> list[Delta]:
    where = f"{path}: {mod}"
    _check_factors(where, parts)
    kind = kind_of(parts)
    tgt = ent_w.target if ent_w else f"{mod}.weight"
    rows = ent_w.rows if ent_w else None
    transpose = ent_w.transpose if ent_w else False
    common = dict(rows=rows, source_key=mod)
    if kind not in _MAKERS:
        raise BadInputError(f"{where}: only {', '.join(sorted(parts))}; no LoRA/LyCORIS factors")
    return _MAKERS[kind](where, parts, tgt, transpose, common, notes, counts, mod, ent_w, ent_b)


# ------------------------------------------------------------------------------------------------ read
def _name_index(base, modules) -> SDNames | WrapperNames:
    """kohya names of the base's tensors, with LyCORIS's whole-model wrapper names when the file uses them."""
    if any(is_wrapper_module(m) for m in modules):
        return wrapper_index(base, modules)
    return SDNames(base.names(), lambda n: tuple(base.info(n).shape))


def _sd_entries(names: SDNames | None, mod: str, notes: set[str], spellings: set[str]
                ) -> tuple[Entry | None, Entry | None] | None:
    """(weight entry, bias entry) of a Stable Diffusion base for a kohya module; (None, None) without a base;
    None when the base lacks it."""
    if names is None:
        return None, None
    found = names.by_kohya.get(mod)
    ent_w, ent_b = (found.get("weight"), found.get("bias")) if found else (None, None)
    if ent_w is None and ent_b is None:
        return None
    ent = ent_w or ent_b
    if ent.module.startswith("unet.") and mod.startswith("lora_unet_"):
        spellings.add("SGM/LDM" if ent.sgm == mod else "diffusers")
    if ent_w is not None and ent_w.rows is not None:
        notes.add("text encoder 2 q/k/v update row slices of the fused in_proj_weight")
    return ent_w, ent_b


def _dit_names(modules: list[str], base, path: Path, transformer: str, strict: bool = True, family: str = ""
               ) -> DitNames | None:
    """The DiT family's names of a file's modules, None when they are not a DiT family's or are a LyCORIS wrapper
    around the diffusers model merged into its diffusers folder (or the transformer/ folder alone): there its
    names are the base's own module paths under a wrapper root, found forward from the base (every layer it
    wrapped, not only the rows of the family's table)."""
    dit = DitNames.detect(modules, base, path, transformer, strict, family)
    if (dit is not None and dit.layout is not None and dit.column == "diffusers" and "lycoris" in dit.dialects
            and dit.layout.prefix in WRAPPER_ROOTS):
        return None
    return dit


def read_single_file(path: Path, fmt: str, base=None, strict: bool = True, transformer: str = "transformer",
                     family: str = "") -> Adapter:
    tensors, meta = load_tensors(path)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unrecognised: list[str] = []
    for key, t in tensors.items():
        sp = split_key(key)
        if sp is None:
            unrecognised.append(key)
            continue
        mod, suffix = sp
        groups[mod][LORA_KEYS.get(suffix, suffix)] = t
    if not groups:
        raise BadInputError(f"{path}: no kohya/LyCORIS keys (lora_unet_*/lora_te*_* with lora_down/up, hada_*, "
                            f"lokr_* ...); e.g. {next(iter(tensors), '(empty file)')}")
    dit = _dit_names(list(groups), base, path, transformer, strict, family)
    names = _name_index(base, groups) if base is not None and not dit else None
    notes: set[str] = {dit.note()} if dit else (set(names.notes) if names is not None else set())
    counts: dict[str, int] = defaultdict(int)
    unmatched: list[str] = []
    deltas: list[Delta] = []
    spellings: set[str] = set()
    for mod, parts in groups.items():
        if dit is not None:
            placed = dit.place(mod, make_deltas(mod, parts, None, None, path, notes, counts), path)
        else:
            found = _sd_entries(names, mod, notes, spellings)
            placed = None if found is None else make_deltas(mod, parts, *found, path, notes, counts)
        if placed is None:
            unmatched.append(mod)
        deltas += placed or []
    skipped = unrecognised + [f"{m}.*" for m in unmatched]
    check_unmatched(path, len(groups) - len(unmatched), unrecognised, unmatched, strict, notes)
    if counts["alpha"]:
        notes.add(f"alpha missing on {counts['alpha']} module(s): scale 1")
    if spellings:
        notes.add("UNet names: " + " and ".join(sorted(spellings)) + (" (SDXL)" if names.family == "sdxl" else ""))
    if base is None:
        notes.add("no base given: " + ("transformer targets take diffusers names; text encoders keep their kohya "
                                       "names" if dit else "targets keep their kohya names")
                  + " (pass --base to merge or convert)")
    if base is not None and not deltas:
        raise BadInputError(f"{path}: none of its modules is in the base")
    metadata = dict(meta)
    if skipped:
        metadata["skipped"] = skipped
    config = {k: meta[k] for k in ("ss_network_module", "ss_network_args", "ss_network_dim", "ss_network_alpha",
                                    "ss_base_model_version") if k in meta}
    return Adapter(deltas, fmt, str(path), config=config, metadata=metadata, notes=sorted(notes), files=[str(path)],
                   name=path.stem, family=dit.summary() if dit else None)


# ------------------------------------------------------------------------------------------------ write
def _kohya_module(d: Delta, names: SDNames | None, unet_names: str | None, sdxl: bool = False) -> str:
    """The kohya module name for a delta's target (forward from the base, or from diffusers-style names)."""
    if names is not None:
        e = names.entry_for_target(d.target, d.rows)
        if e is None or not e.kohya:
            raise BadInputError(f"{d.target}: no kohya name for this base tensor")
        if unet_names == "sgm" and e.sgm:
            return e.sgm
        if unet_names == "diffusers" and e.sgm:
            return next(k for k in e.kohya if k.startswith("lora_unet_") and k != e.sgm)
        return e.kohya[0]
    t = d.target
    if t.startswith(KNOWN_PREFIXES) and "." in t and "." not in t.rsplit(".", 1)[0]:
        return t.rsplit(".", 1)[0]  # read without a base: already a kohya name
    comp, _, rest = t.partition(".")
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2",
              "transformer": "lora_transformer"}.get(comp)
    if prefix is None or d.rows is not None:
        raise BadInputError(f"{t}: cannot name it in kohya form without the base model; pass --base")
    mod = rest.rsplit(".", 1)[0]
    if comp.startswith("text_encoder"):
        mod = te_spellings(mod)[0]  # the ecosystem's CLIP spelling (text_model_...)
    return kohya_name(prefix, mod)


def _dora_scale(mag: torch.Tensor, axis: str, ndim: int) -> torch.Tensor:
    shape = [-1] + [1] * (ndim - 1) if axis == "out" else [1, -1] + [1] * (ndim - 2)
    return mag.reshape(shape).contiguous()


def _alpha(v: float) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float32)


def _lora_parts(d, bake: bool, names) -> list[tuple[str, torch.Tensor]]:
    if d.transpose and not (names and (e := names.entry_for_target(d.target, d.rows)) and e.transpose):
        raise BadInputError(f"{d.target}: a transposed (Conv1D/embedding) LoRA has no kohya form")
    r = int(d.A.shape[0])
    up = (d.B.float() * d.scale).to(d.B.dtype) if bake and d.scale != 1.0 else d.B
    parts = [("lora_down.weight", d.A), ("lora_up.weight", up)]
    if d.mid is not None:
        parts.append(("lora_mid.weight", d.mid))
    parts.append(("alpha", _alpha(r if bake else d.scale * r)))
    if d.magnitude is not None:
        parts.append(("dora_scale", _dora_scale(d.magnitude, d.dora_axis, 4 if d.A.dim() == 4 else 2)))
    return parts


def _loha_parts(d, bake: bool, names) -> list[tuple[str, torch.Tensor]]:
    parts = [(k, t) for k, t in (("hada_w1_a", d.w1a), ("hada_w1_b", d.w1b), ("hada_w2_a", d.w2a),
                                 ("hada_w2_b", d.w2b), ("hada_t1", d.t1), ("hada_t2", d.t2)) if t is not None]
    parts.append(("alpha", _alpha(d.scale * d.rank())))
    if d.magnitude is not None:
        parts.append(("dora_scale", _dora_scale(d.magnitude, d.dora_axis, len(d._product_shape()))))
    return parts


def _lokr_parts(d, bake: bool, names) -> list[tuple[str, torch.Tensor]]:
    parts = [(k, t) for k, t in (("lokr_w1", d.w1), ("lokr_w1_a", d.w1a), ("lokr_w1_b", d.w1b), ("lokr_w2", d.w2),
                                 ("lokr_w2_a", d.w2a), ("lokr_w2_b", d.w2b), ("lokr_t2", d.t2)) if t is not None]
    if d.rank() is None:  # full w1 and w2: readers use scale 1, so bake any other scale in
        if d.scale != 1.0:
            parts = [(k, (t.float() * d.scale).to(t.dtype) if k == "lokr_w1" else t) for k, t in parts]
    else:
        parts.append(("alpha", _alpha(d.scale * d.rank())))
    if d.magnitude is not None:
        parts.append(("dora_scale", _dora_scale(d.magnitude, d.dora_axis, len(d._product_shape()))))
    return parts


def _ia3_parts(d, bake: bool, names) -> list[tuple[str, torch.Tensor]]:
    return [("weight", d.vector), ("on_input", torch.tensor(int(d.on_input)))]


def _full_parts(d, bake: bool, names) -> list[tuple[str, torch.Tensor]]:
    return [("diff", d.diff if d.scale == 1.0 else (d.diff.float() * d.scale).to(d.diff.dtype))]


# the delta kinds a kohya/LyCORIS file stores, each with its key suffixes and tensors
_PARTS = {"lora": _lora_parts, "loha": _loha_parts, "lokr": _lokr_parts, "ia3": _ia3_parts, "full": _full_parts}


def write_single_file(adapter: Adapter, path: Path, base=None, bake: bool = False, unet_names: str | None = None,
                      module_name=None, **_) -> list[Path]:
    """Write `adapter` as one kohya/LyCORIS safetensors file. The scale is kept as `.alpha = s·r` (or, with
    bake=True, multiplied into lora_up with alpha = r), so A1111/ComfyUI/sd-scripts compute the same ΔW.
    `module_name(delta)`, when given, names every module instead (LyCORIS's wrapper dialect: no ss_ metadata)."""
    names = SDNames(base.names(), lambda n: tuple(base.info(n).shape)) if base is not None else None
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    pending_bias: list[Delta] = []
    sdxl = any(d.target.startswith("text_encoder_2.") for d in adapter.deltas)

    def put(mod: str, suffix: str, t: torch.Tensor) -> None:
        key = f"{mod}.{suffix}"
        if key in out:
            raise BadInputError(f"two updates map to {key} ({seen.get(key)})")
        out[key] = t.contiguous()
        seen[key] = suffix

    dit = kohya_modules(adapter, base, adapter.path or path)
    for d_mod, d in dit or [(None, d) for d in adapter.deltas]:
        if d.replaces_base:
            raise BadInputError(f"{d.target}: full replacements have no kohya form")
        if d.stores_dense and d.target.endswith(".bias"):
            if d_mod is None:
                pending_bias.append(d)
            else:  # a DiT module's bias diff, placed by the regrouping like its weight
                put(d_mod, "diff_b", d.diff if d.scale == 1.0 else (d.diff.float() * d.scale).to(d.diff.dtype))
            continue
        mod = d_mod or (module_name(d) if module_name else _kohya_module(d, names, unet_names, sdxl))
        parts = _PARTS.get(d.kind)
        if parts is None:
            raise BadInputError(f"{d.target}: {d.kind} updates have no kohya form")
        for suffix, t in parts(d, bake, names):
            put(mod, suffix, t)
    for d in pending_bias:
        if module_name:
            put(module_name(d), "diff_b", d.diff if d.scale == 1.0 else (d.diff.float() * d.scale).to(d.diff.dtype))
            continue
        wd = type(d)(d.target[: -len(".bias")] + ".weight", diff=d.diff, rows=d.rows)
        mod = _kohya_module(wd, names, unet_names, sdxl) if names is None else None
        if names is not None:
            e = names.entry_for_target(d.target, d.rows)
            if e is None or not e.kohya:
                raise BadInputError(f"{d.target}: no kohya name for this base tensor")
            mod = e.kohya[0]
        put(mod, "diff_b", d.diff if d.scale == 1.0 else (d.diff.float() * d.scale).to(d.diff.dtype))
    meta = {"ss_network_module": "lycoris.kohya" if any(k.split(".", 1)[1] in LYCORIS_ONLY for k in out)
            else "networks.lora", "loraport_source_format": adapter.format}
    if module_name:
        meta.pop("ss_network_module")
    save_file(out, path, meta)
    return [path]


@dataclass(frozen=True)
class KohyaWriteOptions(WriteOptions):
    """bake: multiply the scale into lora_up (alpha = r); unet_names: the UNet spelling, "sgm" (LDM/SGM) or
    "diffusers" (default: the base's own)."""

    bake: bool = False
    unet_names: str | None = choice(None, "sgm", "diffusers")


@register(read=DitReadOptions, write=KohyaWriteOptions)
class KohyaFormat(AdapterFormat):
    name = "kohya"
    title = "kohya / sd-scripts / A1111 / ComfyUI single-file LoRA"
    spec = "kohya"
    output_is_dir = False
    output_suffix = ".safetensors"
    extract_to = True

    @classmethod
    def detect(cls, path: Path) -> int:
        keys = header_keys(path)
        if not keys:
            return 0
        parsed = [sp for k in keys if (sp := split_key(k))]
        if all(s in COMMON_KEYS for _, s in parsed):
            return 0  # alphas alone (a diffusers file's network_alphas): no factors of ours
        if any(s in LYCORIS_ONLY for _, s in parsed) or any(is_wrapper_module(m) for m, _ in parsed):
            return 40  # the LyCORIS face reads these
        return 85 if len(parsed) == len(keys) else 60

    @classmethod
    def read_with(cls, path: Path, base, opts: ReadOptions) -> Adapter:
        return read_single_file(path, cls.name, base=base, strict=opts.strict, transformer=opts.transformer,
                                family=opts.family)

    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base, opts: KohyaWriteOptions) -> list[Path]:
        return write_single_file(adapter, path, base=base, bake=opts.bake, unet_names=opts.unet_names)
