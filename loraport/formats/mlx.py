"""MLX-LM LoRA / DoRA adapters: `adapters.safetensors` + `adapter_config.json`. Spec: formats/mlx.md.

Factors are stored transposed relative to PyTorch (`lora_a [in, r]`, `lora_b [r, out]`) and scaled by an
absolute `lora_parameters.scale` (no division by r). MoE SwitchLinear layers carry `lora_a [E, r, in]`
(older mlx-lm: `[E·r, in]`) and `lora_b [E, out, r]`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from loraport.adapter import Adapter, LoraDelta
from loraport.deltas_experts import ExpertPart, ExpertsLoraDelta, combine_stacked
from loraport.errors import BadInputError, Inexpressible
from loraport.formats import AdapterFormat, ReadOptions, WriteOptions, choice, register
from loraport.formats._experts import unstack_fused
from loraport.formats._llm import (
    bake,
    common_value,
    oriented,
    pad_rank,
    positive_number,
    require_lora_only,
    stack_experts,
)
from loraport.names.llm import expert_index, is_embedding, num_experts, translate
from loraport.safetensors_io import SafetensorsFile, save_file
from loraport.jsonfile import read_json

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
LEAVES = ("lora_a", "lora_b", "m")
DEFAULT_SCALE = 20.0  # mlx-lm's default since 2025-06 (and legacy mlx-examples/lora)
_BLOCK = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def _files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        w = path / WEIGHTS
        if not w.is_file():
            raise BadInputError(f"{path}: no {WEIGHTS} (an MLX adapter folder holds {WEIGHTS} + {CONFIG})")
        c = path / CONFIG
        return w, c if c.is_file() else None
    c = path.parent / CONFIG
    return path, c if c.is_file() else None


def _is_mlx_config(cfg) -> bool:
    return isinstance(cfg, dict) and "peft_type" not in cfg and (
        "lora_parameters" in cfg or "fine_tune_type" in cfg or "lora_layers" in cfg)


@dataclass(frozen=True)
class MlxReadOptions(ReadOptions):
    """mlx_alpha="apply": read an alpha-era config (mlx-lm 2024-01..2024-06) as scale·alpha/rank."""

    mlx_alpha: str = choice("ignore", "apply")


@register(read=MlxReadOptions, write=WriteOptions)
class MlxFormat(AdapterFormat):
    name = "mlx"
    title = "MLX-LM (LoRA, DoRA, MoE SwitchLinear)"
    spec = "mlx"
    output_is_dir = True

    @classmethod
    def detect(cls, path: Path) -> int:
        try:
            w, c = _files(path)
            if c is not None:
                cfg = read_json(c, CONFIG)
                if _is_mlx_config(cfg):
                    return 95
                if isinstance(cfg, dict) and "peft_type" in cfg:
                    return 0
            if w.suffix == ".safetensors" and w.is_file():
                names = SafetensorsFile(w).names()
                if names and all(n.rsplit(".", 1)[-1] in LEAVES for n in names) and any(
                        n.endswith(".lora_a") for n in names):
                    return 60
        except Exception:  # detect never raises
            return 0
        return 0

    # --- read ----------------------------------------------------------------------------------------
    @classmethod
    def read_with(cls, path: Path, base, opts: MlxReadOptions) -> Adapter:
        wfile, cfile = _files(path)
        cfg = read_json(cfile, CONFIG) if cfile else {}
        notes: list[str] = []
        ftype = cfg.get("fine_tune_type") or ("dora" if cfg.get("use_dora") else "lora")
        if ftype == "full":
            raise BadInputError(f"{cfile}: fine_tune_type 'full' holds fine-tuned weights, not an adapter")
        if ftype not in ("lora", "dora"):
            raise BadInputError(f"{cfile}: unknown fine_tune_type {ftype!r} (expected lora or dora)")
        scale = _config_scale(cfg, cfile, opts.mlx_alpha, notes)
        tensors = SafetensorsFile(wfile).load_all()
        groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, t in tensors.items():
            mod, _, leaf = key.rpartition(".")
            if leaf not in LEAVES or not mod:
                raise BadInputError(f"{wfile}: unexpected tensor {key!r}; MLX adapters hold only "
                                    "<module>.lora_a / .lora_b / .m")
            groups[mod][leaf] = t
        names = set(base.names()) if base is not None else None
        deltas = []
        for mod, g in groups.items():
            if "lora_a" not in g or "lora_b" not in g:
                raise BadInputError(f"{wfile}: module {mod!r} has only one of lora_a / lora_b")
            a, b = g["lora_a"], g["lora_b"]
            if b.dim() == 3:
                deltas += _switch_deltas(wfile, mod, a, b, scale, g.get("m"), names)
                continue
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise BadInputError(f"{wfile}: {mod}: lora_a {list(a.shape)} and lora_b {list(b.shape)} are not "
                                    "[in, r] and [r, out]")
            emb = is_embedding(mod)
            m = g.get("m")
            axis = "out"
            if m is not None:
                if ftype != "dora":
                    notes.append(f"{mod}: magnitude 'm' present although fine_tune_type is {ftype}; applied as DoRA")
                # Linear: m per output row. Embedding (mlx DoRAEmbedding): m per table row (the 'in' axis of B@A)
                axis = "in" if emb and m.numel() == a.shape[0] else "out"
            deltas.append(LoraDelta(
                f"{mod}.weight", A=a.t().contiguous(), B=b.t().contiguous(), scale=scale, transpose=emb,
                magnitude=m, dora_axis=axis, alpha=None, scale_rule="scale",
                layer="embedding" if emb else "linear", source_key=f"{mod}.lora_a",
            ))
        deltas = combine_stacked(deltas)
        if any(d.has_magnitude for d in deltas):
            notes.append("DoRA: magnitude per output row, W' = m/||W+sBA|| (W+sBA)")
        return Adapter(deltas, "mlx", str(path), config=cfg, metadata={}, notes=notes,
                       files=[str(wfile)] + ([str(cfile)] if cfile else []), name=path.stem)

    # --- write ---------------------------------------------------------------------------------------
    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base, opts: WriteOptions) -> list[Path]:
        adapter = unstack_fused(adapter, base, "MLX")
        require_lora_only(adapter, "MLX", stacked=True)
        notes: list[str] = []
        loras = [d for d in adapter.deltas if d.has_lora_factors]
        experts = [d for d in adapter.deltas if d.stacked]
        dora = {d.magnitude is not None for d in loras}
        if dora == {True, False}:
            raise Inexpressible("MLX applies DoRA to every adapted layer or none; this adapter mixes DoRA and "
                                "plain LoRA modules")
        scales = [d.scale for d in loras] + [p.scale for x in experts for p in x.parts]
        scale = common_value(scales)
        entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}  # module -> (a, b, m)
        switch: dict[str, dict[int, LoraDelta]] = defaultdict(dict)
        for d in loras:
            if not d.target.endswith(".weight") or not _BLOCK.match(d.target):
                raise BadInputError(f"MLX (mlx-lm) applies LoRA only inside transformer blocks; {d.target} is "
                                    "outside them")
            sw = translate(d.target, "hf", "mlx", experts=True)
            if sw is not None:
                if d.magnitude is not None:
                    raise Inexpressible(f"{d.target}: MLX has no DoRA for MoE experts")
                switch[sw][expert_index(d.target)] = oriented(d, False, base)
                continue
            emb = is_embedding(d.target)
            o = oriented(d, emb, base)
            if o.magnitude is not None and o.dora_axis != ("in" if emb else "out"):
                raise Inexpressible(f"{d.target}: MLX DoRA normalises per output row; this DoRA uses the other axis")
            B = bake(o.B, o.scale / scale)
            entries[d.target[: -len(".weight")]] = (o.A, B, o.magnitude)
        tensors: dict[str, torch.Tensor] = {}
        ranks = [a.shape[0] for a, _, _ in entries.values()]
        sw_entries = {mod: _stack_switch(mod, per, base, scale, notes) for mod, per in switch.items()}
        for x in experts:
            if len(x.parts) != 1 or x.parts[0].out_rows is not None:
                raise BadInputError(f"{x.target}: a fused gate_up expert update has no MLX form (MLX stacks gate "
                                    "and up separately)")
            p = x.parts[0]
            mod = x.target[: -len(".weight")] if x.target.endswith(".weight") else x.target
            sw_entries[mod] = (p.A, bake(p.B, p.scale / scale))
        ranks += [a.shape[1] for a, _ in sw_entries.values()]
        R = max(ranks) if ranks else 8
        if len(set(ranks)) > 1:
            notes.append(f"ranks {sorted(set(ranks))} zero-padded to the single MLX rank {R} (ΔW unchanged)")
        for mod, (A, B, m) in entries.items():
            A, B = pad_rank(A, B, R)
            tensors[f"{mod}.lora_a"] = A.t().contiguous()
            tensors[f"{mod}.lora_b"] = B.t().contiguous()
            if m is not None:
                tensors[f"{mod}.m"] = m.reshape(-1).contiguous()
        for mod, (A, B) in sw_entries.items():
            A, B = pad_rank(A, B, R)
            tensors[f"{mod}.lora_a"] = A.contiguous()
            tensors[f"{mod}.lora_b"] = B.contiguous()
        if len(set(scales)) > 1:
            notes.append(f"per-module scales baked into lora_b; file scale {scale:g}")
        keys = sorted({_BLOCK.match(k[: k.rfind(".")]).group(2) for k in tensors if _BLOCK.match(k[: k.rfind(".")])})
        cfg = {
            "fine_tune_type": "dora" if dora == {True} else "lora",
            "num_layers": -1,
            "lora_parameters": {"rank": int(R), "scale": float(scale), "dropout": 0.0, "keys": keys},
        }
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / WEIGHTS, {"format": "mlx"})
        (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        adapter.notes.extend(notes)
        return [path / WEIGHTS, path / CONFIG]


def _config_scale(cfg: dict, cfile, mlx_alpha: str, notes: list[str]) -> float:
    """The file's one scale: lora_parameters.scale (mlx-lm's default when absent), times alpha/rank for an
    alpha-era config read with mlx_alpha="apply"."""
    lp = cfg.get("lora_parameters") or {}
    if not isinstance(lp, dict):
        raise BadInputError(f"{cfile}: lora_parameters must be an object")
    if "scale" in lp:
        scale = positive_number(lp["scale"], "lora_parameters.scale", cfile)
    else:
        scale = DEFAULT_SCALE
        notes.append(f"no lora_parameters.scale: mlx-lm default scale {DEFAULT_SCALE} assumed")
    if "alpha" in lp:
        alpha = positive_number(lp["alpha"], "lora_parameters.alpha", cfile)
        r_cfg = positive_number(lp.get("rank", 8), "lora_parameters.rank", cfile)
        if mlx_alpha == "apply":
            scale = scale * alpha / r_cfg
            notes.append(f"alpha-era config: scale·alpha/rank = {scale:g} (mlx-lm 2024-01..2024-06 semantics)")
        else:
            notes.append(f"config has lora_parameters.alpha={alpha:g}: ignored as mlx-lm has since 2024-06 "
                         f"(adapters trained 2024-01..2024-06 used scale·alpha/rank = {scale * alpha / r_cfg:g};"
                         " read with mlx_alpha='apply' for those)")
    return scale


def _switch_deltas(wfile: Path, mod: str, a: torch.Tensor, b: torch.Tensor, scale: float, m, names) -> list:
    """A SwitchLinear LoRA -> per-expert LoraDeltas (per-expert base) or one ExpertsLoraDelta (stacked base)."""
    if m is not None:
        raise BadInputError(f"{wfile}: {mod}: DoRA magnitudes on MoE experts are not part of mlx-lm")
    E, out, r = b.shape
    if a.dim() == 2 and a.shape[0] == E * r:  # older mlx-lm: [E·r, in]
        a = a.reshape(E, r, a.shape[1])
    if a.dim() != 3 or a.shape[0] != E or a.shape[1] != r:
        raise BadInputError(f"{wfile}: {mod}: expert lora_a {list(a.shape)} does not fit lora_b {list(b.shape)} "
                            "([E,r,in] / [E,out,r])")
    per_expert = translate(mod, "mlx", "hf", experts=True)
    if per_expert is None:  # unknown family: keep the MLX name, stacked
        return [ExpertsLoraDelta(f"{mod}.weight", parts=[ExpertPart(a, b, scale, None, f"{mod}.lora_a")],
                                 source_key=f"{mod}.lora_a")]
    stacked, _, part = translate(mod, "mlx", "hf_stacked", experts=True).partition(":")
    if names is not None and per_expert.format(xid=0) not in names and stacked in names:
        rows = None
        if part:  # a fused gate_up tensor: gate is the first half of the output axis, up the second
            i = int(part)
            rows = (i * out, (i + 1) * out)
        return [ExpertsLoraDelta(stacked, parts=[ExpertPart(a, b, scale, rows, f"{mod}.lora_a")],
                                 source_key=f"{mod}.lora_a")]
    return [LoraDelta(per_expert.format(xid=e), A=a[e].contiguous(), B=b[e].contiguous(), scale=scale,
                      transpose=False, alpha=None, scale_rule="scale", layer="linear",
                      source_key=f"{mod}.lora_a[{e}]") for e in range(E)]


def _stack_switch(mod: str, per: dict[int, LoraDelta], base, scale: float, notes: list[str]):
    """Per-expert LoRAs of one SwitchLinear → its stacked (A, B), the file's one scale baked into B; experts
    without a LoRA get zero factors (noted)."""
    n = num_experts(base.config if base is not None else None, max(per) + 1)
    if len(per) < n:
        notes.append(f"{mod}: {n - len(per)} expert(s) without LoRA written as zero factors")
    return stack_experts(per, n, lambda r: scale)
