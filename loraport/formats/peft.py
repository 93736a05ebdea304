"""Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` (or a weights-only
`adapter_model.bin`). Spec: formats/peft.md."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch

from loraport.adapter import Adapter, FullDelta, LoraDelta
from loraport.errors import BadInputError
from loraport.formats import AdapterFormat, ReadOptions, WriteOptions, register
from loraport.formats._common import lora_scale
from loraport.formats._peft_lycoris_write import method_of, write_method
from loraport.formats._peft_methods import read_method
from loraport.formats._peft_params import param_deltas, param_tensors
from loraport.formats._peft_saved import SavedTensors
from loraport.patterns import Deadline, PatternTable
from loraport.safetensors_io import save_file
from loraport.jsonfile import read_json
from loraport.tensorfile import load_tensors

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# init schemes that train against a mutated base: valid on the original base only after PEFT's conversion
MUTATED_BASE_INITS = ("pissa", "olora", "corda", "lora_ga", "eva")

# (regex on the key without prefix) -> (role, group that names the module)
_KEY = re.compile(
    r"^(?P<mod>.+?)\.(?:(?P<role>lora_A|lora_B)(?:\.[^.]+)?\.(?P<param>weight|bias)"
    r"|(?P<emb>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?"
    r"|(?P<mag>lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)$"
)


def _num(cfg: dict, key: str, default, path: Path):
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadInputError(f"{path / CONFIG}: {key} must be a number, got {v!r}")
    return v


def _check_method(cfg: dict, path: Path, force: bool) -> list[str]:
    """Refuse what is not a LoRA trained against the unmodified base; the warnings a forced merge must give."""
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MUTATED_BASE_INITS):
        raise BadInputError(
            f"{path}: init_lora_weights={init!r} trains against a modified base; convert it with PEFT's "
            "save_pretrained(path_initial_model_for_weight_conversion=...) first"
        )
    if cfg.get("alora_invocation_tokens"):  # activated LoRA: on only from the invocation tokens onwards
        why = ("activated LoRA (alora_invocation_tokens) acts only on the tokens from its invocation sequence "
               "on; merged, it acts on every token")
        if not force:
            raise BadInputError(f"{path}: {why}").hint("--force", "merges it anyway, with a warning")
        return [f"{path}: {why} — merged because of --force, so the merged model behaves differently"]
    return []


def _sort_keys(tensors: dict[str, torch.Tensor]):
    """(module → LoRA parts, the whole tensors saved beside them, keys not understood)."""
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    saved = SavedTensors()
    unknown = []
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY.match(k)
        if m is None:
            if "lora_" in k or not saved.put(k, t):
                unknown.append(key)
            continue
        mod = m.group("mod")
        if m.group("role"):
            parts[mod][f"{m.group('role')}.{m.group('param')}"] = t
        elif m.group("emb"):
            parts[mod][m.group("emb")] = t
        else:
            parts[mod]["magnitude"] = t
    return parts, saved, unknown


def _module_deltas(mod: str, p: dict, wfile: Path, scale_of, rslora: bool, notes: list[str]) -> list:
    """The LoRA (+ DoRA magnitude, + trainable bias) deltas of one PEFT module's saved parts."""
    deltas: list = []
    emb = "lora_embedding_A" in p or "lora_embedding_B" in p
    A = p.get("lora_embedding_A" if emb else "lora_A.weight")
    B = p.get("lora_embedding_B" if emb else "lora_B.weight")
    if A is None or B is None:
        raise BadInputError(f"{wfile}: module {mod} has only one of its LoRA factors")
    r = int(A.shape[0])
    if B.dim() < 2 or B.shape[1] != r and not (A.dim() == 4 and B.dim() == 4):
        raise BadInputError(f"{wfile}: {mod}: lora_A rank {r} does not match lora_B {list(B.shape)}")
    if A.dim() == 4 and B.shape[1] != r:
        raise BadInputError(f"{wfile}: {mod}: grouped conv LoRA (groups > 1) is not supported")
    _, alpha, cfg_r = scale_of(mod)
    if cfg_r != r:
        notes.append(f"{mod}: rank {r} in the weights, {cfg_r} in the config; the weights win")
    scale = lora_scale(alpha, r, rslora)
    layer = "embedding" if emb else ("conv" if A.dim() > 2 else None)
    deltas.append(LoraDelta(
        f"{mod}.weight", A=A, B=B, scale=scale, transpose=True if emb else None,
        magnitude=p.get("magnitude"), dora_axis="out", alpha=float(alpha),
        scale_rule="alpha/sqrt(r)" if rslora else "alpha/r", layer=layer,
        source_key=PREFIX + mod,
    ))
    if "lora_B.bias" in p:
        deltas.append(FullDelta(f"{mod}.bias", diff=p["lora_B.bias"], scale=scale,
                                source_key=PREFIX + mod + ".lora_B.bias"))
    return deltas


def _write_lora(d, tensors: dict, targets: list, rank_pattern: dict, alpha_pattern: dict) -> bool:
    """Put one LoRA delta's PEFT tensors in `tensors`; True when it is stored transposed (fan_in_fan_out)."""
    if d.mid is not None:
        raise BadInputError(f"{d.target}: Tucker (lora_mid) factors have no PEFT form").hint(
            "--lossy", "re-factors them to low rank")
    if not d.target.endswith(".weight"):
        raise BadInputError(f"{d.target}: PEFT LoRA targets a module's .weight")
    mod = d.target[: -len(".weight")]
    emb = d.layer == "embedding"
    if d.magnitude is not None and d.dora_axis != "out":
        raise BadInputError(f"{d.target}: PEFT DoRA normalises per output feature; this DoRA uses "
                            "the input axis")
    ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
    tensors[f"{PREFIX}{mod}.{ka}"] = d.A.contiguous()
    tensors[f"{PREFIX}{mod}.{kb}"] = d.B.contiguous()
    if d.magnitude is not None:
        tensors[f"{PREFIX}{mod}.lora_magnitude_vector"] = d.magnitude.contiguous()
    targets.append(mod)
    rank_pattern[mod] = int(d.A.shape[0])
    alpha_pattern[mod] = d.scale * d.A.shape[0]
    return bool(d.transpose and not emb)


@register(write=WriteOptions)
class PeftFormat(AdapterFormat):
    name = "peft"
    title = "Hugging Face PEFT (LoRA, rsLoRA, DoRA, AdaLoRA, LoHa, LoKr, IA³, VeRA, OFT, BOFT, MiSS)"
    spec = "peft"
    output_is_dir = True
    extract_to = True

    @classmethod
    def detect(cls, path: Path) -> int:
        try:
            if path.is_dir() and (path / CONFIG).is_file():
                cfg = read_json(path / CONFIG, CONFIG)
                return 90 if "peft_type" in cfg else 20
        except (OSError, ValueError, BadInputError):
            return 10
        return 0

    @classmethod
    def read_with(cls, path: Path, base, opts: ReadOptions) -> Adapter:
        if not path.is_dir():
            raise BadInputError(f"{path}: a PEFT adapter is a folder with {CONFIG} and {WEIGHTS[0]}")
        cfg = read_json(path / CONFIG, CONFIG)
        ptype = str(cfg.get("peft_type", "LORA")).upper()
        if ptype != "LORA":  # LoHa, LoKr, IA³, VeRA, AdaLoRA, OFT, BOFT, MiSS; the unmergeable ones refused
            return read_method(path, cfg, base, ptype)
        warnings = _check_method(cfg, path, opts.force)
        wfile = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
        if wfile is None:
            raise BadInputError(f"{path}: missing {WEIGHTS[0]} (or legacy {WEIGHTS[1]})")
        tensors, meta = load_tensors(wfile)

        r_default = _num(cfg, "r", 8, path)
        a_default = _num(cfg, "lora_alpha", 8, path)
        deadline = Deadline()
        rank_pattern = PatternTable(cfg.get("rank_pattern"), "rank_pattern", str(path / CONFIG), deadline)
        alpha_pattern = PatternTable(cfg.get("alpha_pattern"), "alpha_pattern", str(path / CONFIG), deadline)
        rslora = bool(cfg.get("use_rslora", False))
        notes: list[str] = []
        if cfg.get("fan_in_fan_out"):
            notes.append("fan_in_fan_out flag ignored: orientation is decided from the base layer")

        parts, saved, unknown = _sort_keys(tensors)
        if unknown:
            raise BadInputError(
                f"{wfile}: unsupported PEFT entries (e.g. {unknown[0]}); only LoRA/DoRA, modules_to_save, "
                "trainable tokens and trainable biases are understood"
            )

        def scale_of(name: str) -> tuple[float, float, int]:
            r = int(rank_pattern.positive(name, r_default))
            alpha = alpha_pattern.positive(name, a_default)
            return lora_scale(alpha, r, rslora), float(alpha), r

        deltas = param_deltas(parts, cfg, base, wfile, scale_of, notes)  # target_parameters (MoE experts)
        for mod, p in parts.items():
            deltas.extend(_module_deltas(mod, p, wfile, scale_of, rslora, notes))
        whole, saved_notes = saved.deltas(cfg, str(wfile), PREFIX)
        deltas += whole
        if any(d.has_magnitude for d in deltas):
            notes.append("DoRA: magnitude per output feature, W' = m/||W+sBA|| (W+sBA)")
        if any(d.replaces_base for d in whole):
            notes.append(f"{sum(d.replaces_base for d in whole)} full replacement tensor(s) "
                         "(modules_to_save / saved embeddings / trainable biases)")
        notes += saved_notes
        return Adapter(deltas, "peft", str(path), config=cfg, metadata=meta, notes=notes,
                       files=[str(path / CONFIG), str(wfile)], name=path.name, warnings=warnings)

    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base, opts: WriteOptions) -> list[Path]:
        """Write PEFT files into the folder `path` (which must exist and be empty: callers stage it)."""
        method = method_of(adapter)  # all LoHa or all LoKr: PEFT's own LOHA / LOKR form, exactly
        if method is not None:
            return write_method(adapter, path, method)
        tensors: dict[str, torch.Tensor] = {}
        rank_pattern: dict[str, int] = {}
        alpha_pattern: dict[str, float] = {}
        targets, to_save = [], []
        token_rows: dict[str, list[int]] = {}
        dora = {d.has_magnitude for d in adapter.deltas if d.has_lora_factors}
        if dora == {True, False}:
            raise BadInputError("PEFT cannot express DoRA on some modules and plain LoRA on others")
        fan_in_fan_out = False
        loras = [d for d in adapter.deltas if d.has_lora_factors]
        fused = [d for d in adapter.deltas if d.stacked and not d.target.endswith(".weight")]
        for d in adapter.deltas:
            if d.stacked and not d.target.endswith(".weight"):
                continue  # transformers' fused expert parameters: target_parameters, written below
            if d.rows is not None:
                raise BadInputError(f"{d.target}: a row-sliced update (fused projection) has no PEFT form")
            if d.has_lora_factors:
                fan_in_fan_out |= _write_lora(d, tensors, targets, rank_pattern, alpha_pattern)
            elif d.replaces_base and d.saved_base:
                mod, leaf = d.target.rsplit(".", 1)  # PEFT's own saved copy of a targeted layer
                tensors[f"{PREFIX}{mod}.base_layer.{leaf}"] = d.value.contiguous()
            elif (tr := d.trained_rows()) is not None and d.target.endswith(".weight"):
                mod = d.target[: -len(".weight")]
                tensors[f"{PREFIX}{mod}.token_adapter.trainable_tokens_delta"] = tr[1].contiguous()
                token_rows[mod.rsplit(".", 1)[-1]] = list(tr[0])
            elif d.replaces_base:
                tensors[PREFIX + d.target] = d.value.contiguous()
                to_save.append(d.target.rsplit(".", 1)[0])
            elif d.stores_dense and d.target.endswith(".bias") and any(
                x.target == d.target[:-5] + ".weight" for x in loras
            ):
                owner = next(x for x in loras if x.target == d.target[:-5] + ".weight")
                tensors[f"{PREFIX}{d.target[:-5]}.lora_B.bias"] = (d.diff.float() * (d.scale / owner.scale)).to(
                    d.diff.dtype)
            else:
                raise BadInputError(f"{d.target}: {d.kind} updates have no PEFT LoRA form").hint(
                    "--lossy", "re-factors them to low rank")
        ptensors, params = param_tensors(fused, base, PREFIX, rank_pattern, alpha_pattern) if fused else ({}, [])
        tensors.update(ptensors)
        ranks = list(rank_pattern.values())
        alphas = list(alpha_pattern.values())
        r0 = max(set(ranks), key=ranks.count) if ranks else 8
        a0 = max(set(alphas), key=alphas.count) if alphas else float(r0)
        a0 = int(a0) if float(a0).is_integer() else a0
        cfg = {
            "peft_type": "LORA",
            "task_type": adapter.config.get("task_type") if adapter.format == "peft" else None,
            "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
            "r": r0,
            "lora_alpha": a0,
            "use_rslora": False,
            "use_dora": dora == {True},
            "fan_in_fan_out": fan_in_fan_out,
            "target_modules": sorted(set(targets)),
            **({"target_parameters": params} if params else {}),
            "rank_pattern": {re.escape(m): r for m, r in rank_pattern.items() if r != r0},
            "alpha_pattern": {re.escape(m): a for m, a in alpha_pattern.items() if a != a0},
            "modules_to_save": sorted(set(to_save)) or None,
            "trainable_token_indices": token_rows or None,
            "lora_dropout": 0.0,
            "bias": "none",
            "lora_bias": any(k.endswith("lora_B.bias") for k in tensors),
            "init_lora_weights": True,
            "inference_mode": True,
        }
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, path / WEIGHTS[0], {"format": "pt"})
        return [path / CONFIG, path / WEIGHTS[0]]
