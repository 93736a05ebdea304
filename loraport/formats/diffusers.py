"""diffusers LoRA files (`pytorch_lora_weights.safetensors`): PEFT-style keys under a pipeline component
(`unet.` / `text_encoder.` / `text_encoder_2.` / `transformer.`), the LoraConfig per component in the
safetensors metadata (`lora_adapter_metadata`), kohya-converted `network_alphas`, and the legacy
attention-processor spellings (`…processor.to_q_lora.down.weight`, `…lora_linear_layer.up.weight`).
Spec: formats/diffusers.md."""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch

from loraport.adapter import Adapter, FullDelta, LoraDelta
from loraport.errors import BadInputError
from loraport.formats._common import check_unmatched, lora_scale
from loraport.formats._dit import DitNames, DitReadOptions
from loraport.formats._dit_write import diffusers_deltas
from loraport.formats._dit_control import read_control
from loraport.formats import AdapterFormat, ReadOptions, WriteOptions, register
from loraport.formats.kohya import header_keys
from loraport.patterns import Deadline, PatternTable
from loraport.names import dit as dit_names
from loraport.names.sd import SDNames, te_spellings
from loraport.safetensors_io import save_file
from loraport.jsonfile import loads_json
from loraport.tensorfile import load_tensors

WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior", "decoder")
# legacy attention-processor projections → module (UNet attention / CLIP text attention)
LEGACY_PROJ = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
               "to_out": ("to_out.0", "out_proj")}

_PROJ = "to_q|to_k|to_v|to_out"
# key → (module, role); role in A, B, bias, magnitude, alpha. Order matters: first match wins.
KEY_FORMS: tuple[tuple[re.Pattern, str, str], ...] = (
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.default)?\.weight$"), "A", "peft"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.default)?\.weight$"), "B", "peft"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.default)?\.bias$"), "bias", "peft"),
    (re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$"), "magnitude", "peft"),
    (re.compile(rf"^(?P<m>.+?)(?:\.processor)?\.(?P<p>{_PROJ})_lora\.down\.weight$"), "A", "attn-processor"),
    (re.compile(rf"^(?P<m>.+?)(?:\.processor)?\.(?P<p>{_PROJ})_lora\.up\.weight$"), "B", "attn-processor"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.down\.weight$"), "A", "lora_linear_layer"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.up\.weight$"), "B", "lora_linear_layer"),
    (re.compile(r"^(?P<m>.+)\.lora\.down\.weight$"), "A", "lora.down/up"),
    (re.compile(r"^(?P<m>.+)\.lora\.up\.weight$"), "B", "lora.down/up"),
    # ComfyUI's LoRA save / extract nodes: the diffusion_model. names with kohya's factor names (no alpha: scale 1)
    (re.compile(r"^(?P<m>diffusion_model\..+)\.lora_down\.weight$"), "A", "ComfyUI lora_down/up"),
    (re.compile(r"^(?P<m>diffusion_model\..+)\.lora_up\.weight$"), "B", "ComfyUI lora_down/up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha", "network_alphas"),
)


def parse_key(key: str) -> tuple[str, str, str] | None:
    """key → (component-prefixed module path, role, spelling) or None."""
    for rx, role, form in KEY_FORMS:
        m = rx.match(key)
        if not m:
            continue
        mod = m.group("m")
        if form == "attn-processor":
            unet_name, te_name = LEGACY_PROJ[m.group("p")]
            mod = f"{mod}.{te_name if mod.startswith('text_encoder') else unet_name}"
        if "lora_" in mod.rsplit(".", 1)[-1]:
            return None
        return mod, role, form
    return None


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        f = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
        if f is None:
            raise BadInputError(f"{path}: no {WEIGHTS[0]} in this folder")
        return f
    return path


def component_configs(meta: dict[str, str], where: Path) -> dict[str, dict]:
    """lora_adapter_metadata {"unet.r": 4, "text_encoder.lora_alpha": 8, ...} → {"unet": {"r": 4}, ...}."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    flat = loads_json(raw, str(where), METADATA_KEY)
    if not isinstance(flat, dict):
        raise BadInputError(f"{where}: {METADATA_KEY} must be a JSON object")
    out: dict[str, dict] = defaultdict(dict)
    for k, v in flat.items():
        comp, dot, field = str(k).partition(".")
        if dot:
            out[comp][field] = v
    return dict(out)


def _component_alpha(tables: dict, comp: str, cfg: dict, module: str, where: Path, deadline: Deadline):
    """PEFT's rule over the component's alpha_pattern (bounded: loraport.patterns), else its lora_alpha."""
    if comp not in tables:
        tables[comp] = PatternTable(cfg.get("alpha_pattern"), f"{comp}.alpha_pattern", f"{where}: {METADATA_KEY}",
                                    deadline)
    hit = tables[comp].lookup(module)
    return hit[1] if hit else cfg.get("lora_alpha", 8)


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadInputError(f"{METADATA_KEY}: {what} must be a number, got {v!r}")
    return float(v)


def _group_keys(tensors: dict[str, torch.Tensor], notes: set[str]):
    """(component-prefixed module → {role: tensor}, the spellings of the factors, keys not recognised)."""
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    forms: set[str] = set()
    unrecognised = []
    for key, t in tensors.items():
        p = parse_key(key)
        if p is None:
            unrecognised.append(key)
            continue
        mod, role, form = p
        if mod.split(".", 1)[0] not in COMPONENTS and not dit_names.unspell(mod):  # DiT dialects keep theirs
            mod = "unet." + mod
            notes.add("keys without a component prefix: read as unet")
        parts[mod][role] = t
        if role in ("A", "B"):
            forms.add(form)
    return parts, forms, unrecognised


def _module_scale(p: dict, cfg: dict | None, r: int, cfg_alpha) -> tuple[float | None, float, str]:
    """(alpha, scale, rule) of one module: from its component's LoraConfig (`cfg_alpha`: its alpha for this
    module) when the file has one, else from its network_alphas entry, else scale 1 (alpha None)."""
    if cfg is not None:
        alpha = _number(cfg_alpha, "lora_alpha")
        rs = bool(cfg.get("use_rslora", False))
        return alpha, lora_scale(alpha, r, rs), "alpha/sqrt(r)" if rs else "alpha/r"
    if "alpha" in p:
        alpha = float(p["alpha"].float().reshape(-1)[0])
        return alpha, lora_scale(alpha, r), "alpha/r"
    return None, 1.0, "alpha/r"


def _base_entry(names: SDNames, mod: str, comp: str, rel: str):
    """The base's weight entry for a module, under its own or another CLIP spelling (None: not in the base)."""
    for spelled in (mod, *[f"{comp}.{s}" for s in te_spellings(rel)]):
        if (found := names.by_module.get(spelled)) and "weight" in found:
            return found["weight"]
    return None


def _module_deltas(mod: str, p: dict, scale: float, alpha, rule: str, target: str | None = None,
                   rows: tuple[int, int] | None = None, transpose: bool = False) -> list:
    """The LoRA (DoRA) of one module and the dense update of its bias when lora_B has one."""
    target = target or f"{mod}.weight"
    mag = p.get("magnitude")
    out = [LoraDelta(target, A=p["A"], B=p["B"], scale=scale, alpha=alpha, scale_rule=rule, rows=rows,
                     transpose=transpose, magnitude=None if mag is None else mag.reshape(-1), dora_axis="out",
                     source_key=mod)]
    if "bias" in p:
        out.append(FullDelta(target[: -len(".weight")] + ".bias", diff=p["bias"], scale=scale, rows=rows,
                             source_key=mod + ".bias"))
    return out


def _placed(mod: str, p: dict, scale: float, alpha, rule: str, dit: DitNames | None, names: SDNames | None,
            wfile: Path) -> list | None:
    """A module's deltas on the base's tensors (a DiT family's, or a Stable Diffusion base's), None when the base
    lacks the module; targets keep the file's names without a base."""
    if dit is not None:
        return dit.place(mod, _module_deltas(mod, p, scale, alpha, rule), wfile)
    if names is None:
        return _module_deltas(mod, p, scale, alpha, rule)
    comp, _, rel = mod.partition(".")
    ent = _base_entry(names, mod, comp, rel)
    if ent is None:
        return None
    return _module_deltas(mod, p, scale, alpha, rule, ent.target, ent.rows, ent.transpose)


@register(read=DitReadOptions, write=WriteOptions)
class DiffusersFormat(AdapterFormat):
    name = "diffusers"
    title = "diffusers LoRA (pytorch_lora_weights.safetensors)"
    spec = "diffusers"

    @classmethod
    def detect(cls, path: Path) -> int:
        try:
            if path.is_dir():
                return 90 if any((path / w).is_file() for w in WEIGHTS) else 0
            keys = header_keys(path)
        except OSError:
            return 0
        parsed = [p for k in keys if (p := parse_key(k)) and p[1] != "alpha"]
        if not parsed:
            return 0
        prefixed = sum(p[0].split(".", 1)[0] in COMPONENTS for p in parsed)
        if any(k.startswith("base_model.model.") for k in keys) and not any(dit_names.unspell(p[0]) for p in parsed):
            return 0  # PEFT keys: a PEFT adapter folder, not a diffusers file (unless a DiT's original names: fal)
        return 85 if prefixed == len(parsed) else 50

    @classmethod
    def read_with(cls, path: Path, base, opts: ReadOptions) -> Adapter:
        path = Path(path)
        wfile = _weights_file(path)
        tensors, meta = load_tensors(wfile)
        configs = component_configs(meta, wfile)
        notes: set[str] = set()
        parts, forms, unrecognised = _group_keys(tensors, notes)
        dit = DitNames.detect(list(parts), base, wfile, opts.transformer, opts.strict, opts.family)
        names = SDNames(base.names(), lambda n: tuple(base.info(n).shape)) if base is not None and not dit else None
        if dit:
            notes.add(dit.note())
        deltas, unmatched, no_alpha = [], [], 0
        tables: dict[str, PatternTable] = {}
        deadline = Deadline()
        for mod, p in parts.items():
            if "A" not in p or "B" not in p:
                if set(p) <= {"alpha"}:
                    unrecognised.append(mod + ".alpha")
                    continue
                raise BadInputError(f"{wfile}: {mod} has only one of its LoRA factors")
            A, B = p["A"], p["B"]
            r = int(A.shape[0])
            if B.dim() < 2 or B.shape[1] != r:
                raise BadInputError(f"{wfile}: {mod}: down/A {list(A.shape)} and up/B {list(B.shape)} do not fit")
            comp, _, rel = mod.partition(".")
            cfg = configs.get(comp)
            cfg_alpha = None if cfg is None else _component_alpha(tables, comp, cfg, rel, wfile, deadline)
            alpha, scale, rule = _module_scale(p, cfg, r, cfg_alpha)
            no_alpha += alpha is None
            placed = _placed(mod, p, scale, alpha, rule, dit, names, wfile)
            if placed is None:
                unmatched.append(mod)
            deltas += placed or []
        warnings, control = [], None
        if dit:  # a Flux Control LoRA's full tensors and widened input (formats/_dit_control.py)
            deltas, unrecognised, more, warnings, control, line = read_control(
                dit, deltas, {k: tensors[k] for k in unrecognised}, wfile)
            unmatched += more
            notes |= {line} if line else set()
        check_unmatched(wfile, len(deltas), unrecognised, unmatched, opts.strict, notes)
        if not deltas:
            raise BadInputError(f"{wfile}: no diffusers LoRA modules found")
        if configs:
            notes.add("scale from lora_adapter_metadata (" + ", ".join(sorted(configs)) + ")")
        elif no_alpha:
            notes.add(f"alpha missing on {no_alpha} module(s): scale 1")
        if "network_alphas" in {f for *_, f in (parse_key(k) or ("", "", "") for k in tensors)}:
            notes.add("network_alphas (kohya-converted) give the scale")
        legacy = forms - {"peft"}
        if legacy:
            notes.add("legacy spelling: " + ", ".join(sorted(legacy)))
        if any(d.has_magnitude for d in deltas):
            notes.add("DoRA: magnitude per output feature (PEFT)")
        metadata = dict(meta)
        if unrecognised or unmatched:
            metadata["skipped"] = unrecognised + unmatched
        family = None if not dit else {**dit.summary(), **({"control": control} if control else {})}
        return Adapter(deltas, "diffusers", str(path), config=configs, metadata=metadata, notes=sorted(notes),
                       warnings=warnings, files=[str(wfile)], name=path.stem, family=family)

    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base, opts: WriteOptions) -> list[Path]:
        """One pytorch_lora_weights-style file: PEFT keys under component prefixes, the per-component
        LoraConfig (ranks/alphas as rank_pattern/alpha_pattern) in `lora_adapter_metadata`."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS[0]
        deltas = diffusers_deltas(adapter, base, adapter.path or path)
        names = None
        if deltas is None:
            deltas = adapter.deltas
            names = SDNames(base.names(), lambda n: tuple(base.info(n).shape)) if base is not None else None
        tensors: dict[str, torch.Tensor] = {}
        per: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
        dora: dict[str, set] = defaultdict(set)
        for d in deltas:
            if not d.has_lora_factors:
                raise BadInputError(f"{d.target}: {d.kind} updates have no diffusers LoRA form (it holds plain "
                                    "LoRA/DoRA only); convert to kohya/lycoris instead")
            if d.mid is not None:
                raise BadInputError(f"{d.target}: Tucker (lora_mid) factors have no diffusers form")
            if d.magnitude is not None and d.dora_axis != "out":
                raise BadInputError(f"{d.target}: diffusers (PEFT) DoRA normalises per output feature; this DoRA "
                                    "uses the input axis")
            if names is not None:
                ent = names.entry_for_target(d.target, d.rows)
                if ent is None:
                    raise BadInputError(f"{d.target}: not a tensor of the given base")
                if bool(d.transpose) != ent.transpose:
                    raise BadInputError(f"{d.target}: a transposed LoRA has no diffusers form")
                mod = ent.module
            else:
                comp = d.target.split(".", 1)[0]
                if comp not in COMPONENTS or not d.target.endswith(".weight") or d.rows is not None:
                    raise BadInputError(f"{d.target}: cannot name it as a diffusers module without the base; "
                                        "pass --base")
                if d.transpose:
                    raise BadInputError(f"{d.target}: a transposed LoRA has no diffusers form")
                mod = d.target[: -len(".weight")]
            comp, _, rel = mod.partition(".")
            tensors[f"{mod}.lora_A.weight"] = d.A.contiguous()
            tensors[f"{mod}.lora_B.weight"] = d.B.contiguous()
            if d.magnitude is not None:
                m = d.magnitude.reshape(-1)
                tensors[f"{mod}.lora_magnitude_vector"] = (m.reshape(1, -1, 1, 1) if d.A.dim() == 4 else m).contiguous()
            r = int(d.A.shape[0])
            # patterns match the module path inside the component; drop CLIP's optional text_model. wrapper
            per[comp][te_spellings(rel)[-1]] = (r, d.scale * r)
            dora[comp].add(d.magnitude is not None)
        meta_cfg: dict[str, object] = {}
        for comp, mods in per.items():
            if len(dora[comp]) > 1:
                raise BadInputError(f"component {comp}: DoRA on some modules and plain LoRA on others has no "
                                    "diffusers form")
            ranks = Counter(r for r, _ in mods.values())
            alphas = Counter(a for _, a in mods.values())
            r0, a0 = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
            cfg = {
                "r": r0, "lora_alpha": int(a0) if float(a0).is_integer() else a0,
                "target_modules": sorted(mods), "use_rslora": False, "use_dora": dora[comp] == {True},
                "rank_pattern": {re.escape(m): r for m, (r, _) in mods.items() if r != r0},
                "alpha_pattern": {re.escape(m): a for m, (_, a) in mods.items() if a != a0},
                "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
            }
            meta_cfg.update({f"{comp}.{k}": v for k, v in cfg.items()})
        from loraport._version import __version__

        # loraport.version: the stamp that lets `--overwrite` recognise a file loraport wrote (loraport/outputs.py)
        save_file(tensors, path, {"format": "pt", METADATA_KEY: json.dumps(meta_cfg, indent=2, sort_keys=True),
                                  "loraport.version": __version__})
        return [path]
