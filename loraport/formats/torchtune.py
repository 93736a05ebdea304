"""torchtune native LoRA / DoRA adapters: `adapter_model.pt` (or `.safetensors`) with Meta-layout names
(`layers.0.attn.q_proj.lora_a.weight`) + `adapter_config.json` (`r`, `lora_alpha`). Spec: formats/torchtune.md.

torchtune keeps Meta's q/k row order for the Llama family (interleaved RoPE pairs), so against an HF base
the rows of q/k `lora_b` (and DoRA magnitudes) are un-permuted, as torchtune itself does when it exports the
PEFT copy. Without a base the torchtune names are kept (for a torchtune/Meta-layout base).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from loraport.adapter import Adapter, LoraDelta
from loraport.errors import BadInputError, Inexpressible
from loraport.formats import AdapterFormat, ReadOptions, WriteOptions, register
from loraport.formats._common import lora_scale
from loraport.formats._llm import (
    bake,
    common_value,
    oriented,
    pad_rank,
    positive_number,
    require_lora_only,
)
from loraport.names.llm import (
    TORCHTUNE_PERMUTED,
    head_counts,
    qk_kind,
    rope_permute_rows,
    rope_unpermute_rows,
    translate,
)
from loraport.safetensors_io import SafetensorsFile
from loraport.jsonfile import read_json
from loraport.tensorfile import load_tensors

WEIGHTS = ("adapter_model.pt", "adapter_model.safetensors", "adapter_model.bin")
CONFIG = "adapter_config.json"
NATIVE = (".lora_a.weight", ".lora_b.weight", ".magnitude")


def _native_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for w in WEIGHTS:
        p = path / w
        if p.is_file():
            if p.suffix == ".safetensors":
                try:
                    if not any(n.endswith(NATIVE) for n in SafetensorsFile(p).names()):
                        continue  # torchtune's PEFT-format export: the PEFT reader's job
                except Exception:
                    continue
            return p
    return None


def _tt_qk(name: str) -> str | None:
    return qk_kind(translate(name, "torchtune", "hf") or "")


def _groups(tensors: dict[str, torch.Tensor], wfile: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module → {"a": lora_a, "b": lora_b, "m": magnitude} (any other tensor refused)."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        for suf, role in ((".lora_a.weight", "a"), (".lora_b.weight", "b"), (".magnitude", "m")):
            if key.endswith(suf):
                groups[key[: -len(suf)]][role] = t
                break
        else:
            hint = " (torchtune MoE expert LoRA is not supported)" if "lora_" in key else ""
            raise BadInputError(f"{wfile}: unexpected tensor {key!r}{hint}; torchtune adapters hold "
                                "<module>.lora_a.weight / .lora_b.weight / .magnitude")
    return groups


def _permutation(base) -> tuple[bool, int, int]:
    """(whether q/k rows are in Meta's RoPE order for this HF base, heads, kv heads)."""
    if base.model_type() not in TORCHTUNE_PERMUTED:
        return False, 0, 0
    try:
        nh, nkv = head_counts(base.config)
    except ValueError as e:
        raise BadInputError(f"{base.root}/config.json: {e}") from None
    return True, nh, nkv


@dataclass(frozen=True)
class TorchtuneReadOptions(ReadOptions):
    """alpha: the recipe's lora_alpha, for weights saved without their adapter_config.json."""

    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.alpha is not None:
            positive_number(self.alpha, "alpha", "torchtune read option")


@register(read=TorchtuneReadOptions, write=WriteOptions)
class TorchtuneFormat(AdapterFormat):
    name = "torchtune"
    title = "torchtune (native LoRA / DoRA)"
    spec = "torchtune"
    output_is_dir = True
    own_naming = ("layers.", "tok_embeddings")

    @classmethod
    def detect(cls, path: Path) -> int:
        try:
            f = _native_file(path)
            if f is None:
                return 0
            if f.suffix == ".safetensors":
                names = SafetensorsFile(f).names()
                return 95 if any(n.endswith((".lora_a.weight", ".lora_b.weight")) for n in names) else 0
            return 95 if f.name == "adapter_model.pt" else 0
        except Exception:
            return 0

    @classmethod
    def read_with(cls, path: Path, base, opts: TorchtuneReadOptions) -> Adapter:
        alpha = opts.alpha
        wfile = _native_file(path)
        if wfile is None:
            raise BadInputError(f"{path}: no torchtune adapter weights ({' / '.join(WEIGHTS)} with lora_a/lora_b keys)")
        cdir = wfile.parent
        cfg = read_json(cdir / CONFIG, CONFIG) if (cdir / CONFIG).is_file() else {}
        groups = _groups(load_tensors(wfile)[0], wfile)
        if alpha is None:
            if "lora_alpha" not in cfg:
                raise BadInputError(f"{wfile}: torchtune stores no alpha in the weights and {cdir / CONFIG} (with "
                                    "r and lora_alpha) is missing; put the recipe's lora_alpha there")
            alpha = positive_number(cfg["lora_alpha"], "lora_alpha", cdir / CONFIG)
        notes = []
        to_hf = base is not None and not any(f"{m}.weight" in base for m in groups)
        permute, nh, nkv = _permutation(base) if to_hf else (False, 0, 0)
        if base is None:
            notes.append("targets kept in torchtune (Meta-layout) naming; pass --base HF_MODEL to map them to HF "
                         "names and undo the q/k row permutation")
        deltas = []
        for mod, g in groups.items():
            if "a" not in g or "b" not in g:
                raise BadInputError(f"{wfile}: module {mod!r} has only one of lora_a / lora_b")
            A, B, m = g["a"], g["b"], g.get("m")
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise BadInputError(f"{wfile}: {mod}: lora_a {list(A.shape)} / lora_b {list(B.shape)} "
                                    "do not share a rank")
            r = A.shape[0]
            target = f"{mod}.weight"
            if to_hf:
                hf = translate(target, "torchtune", "hf")
                if hf is None:
                    raise BadInputError(f"{wfile}: no HF name known for torchtune module {mod!r} (see "
                                        "loraport/names/llm.py)")
                kind = qk_kind(hf)
                if permute and kind:
                    n = nh if kind == "q" else nkv
                    B = rope_unpermute_rows(B, n)
                    m = rope_unpermute_rows(m.reshape(-1), n) if m is not None else None
                target = hf
            deltas.append(LoraDelta(target, A=A, B=B, scale=lora_scale(alpha, r), transpose=False, magnitude=m,
                                    dora_axis="out", alpha=alpha, layer="linear", source_key=f"{mod}.lora_a.weight"))
        if permute and any(qk_kind(d.target) for d in deltas):
            notes.append("q/k lora_b rows (and DoRA magnitudes) un-permuted from Meta's RoPE order to the HF base's")
        if cfg.get("r") not in (None, *{d.A.shape[0] for d in deltas}):
            notes.append(f"config r={cfg.get('r')} differs from the weights' rank; the weights win")
        return Adapter(deltas, "torchtune", str(path), config=cfg, notes=notes,
                       files=[str(wfile)] + ([str(cdir / CONFIG)] if cfg else []), name=path.stem)

    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base, opts: WriteOptions) -> list[Path]:
        require_lora_only(adapter, "torchtune")
        notes = []
        hf_named = any(not d.target.startswith("layers.") and d.target not in ("output.weight",)
                       for d in adapter.deltas)
        permute, nh, nkv = False, 0, 0
        if hf_named:
            qk = any(qk_kind(d.target) for d in adapter.deltas)
            if qk and base is None:
                raise BadInputError("writing torchtune from HF names needs --base (the HF model): q/k rows are "
                                    "permuted to Meta's layout with the model's head counts")
            if base is not None and base.model_type() in TORCHTUNE_PERMUTED:
                permute = True
                nh, nkv = head_counts(base.config)
        R = max(d.A.shape[0] for d in adapter.deltas)
        alpha = float(common_value([d.scale for d in adapter.deltas])) * R
        dora = {d.magnitude is not None for d in adapter.deltas}
        if dora == {True, False}:
            raise Inexpressible("torchtune applies DoRA to every adapted layer or none; this adapter mixes them")
        tensors: dict[str, torch.Tensor] = {}
        targets = set()
        for d in adapter.deltas:
            if d.layer == "embedding" or (d.transpose is None and d.layer is None and "embed" in d.target):
                raise Inexpressible(f"{d.target}: torchtune has no embedding LoRA")
            o = oriented(d, False, base)
            if o.magnitude is not None and o.dora_axis != "out":
                raise Inexpressible(f"{d.target}: torchtune DoRA normalises per output row; this DoRA uses "
                                    "the input axis")
            name = translate(d.target, "hf", "torchtune") if hf_named else d.target
            if name is None:
                raise BadInputError(f"{d.target}: no torchtune name for this tensor (see loraport/names/llm.py)")
            A, B = pad_rank(o.A, bake(o.B, o.scale / (alpha / R)), R)
            m = o.magnitude.reshape(-1) if o.magnitude is not None else None
            kind = qk_kind(d.target) if hf_named else None
            if permute and kind:
                n = nh if kind == "q" else nkv
                B = rope_permute_rows(B, n)
                m = rope_permute_rows(m, n) if m is not None else None
            if not name.endswith(".weight"):  # e.g. a norm's `.scale`: torchtune LoRA adapts linear weights only
                raise Inexpressible(f"{d.target}: torchtune names it {name}, not a linear weight it can adapt")
            mod = name[: -len(".weight")]
            tensors[f"{mod}.lora_a.weight"] = A.contiguous()
            tensors[f"{mod}.lora_b.weight"] = B.contiguous()
            if m is not None:
                tensors[f"{mod}.magnitude"] = m.contiguous()
            targets.add(mod.rsplit(".", 1)[-1])
        if len({d.A.shape[0] for d in adapter.deltas}) > 1:
            notes.append(f"ranks zero-padded to the single torchtune rank {R} (ΔW unchanged)")
        if len({d.scale for d in adapter.deltas}) > 1:
            notes.append(f"per-module scales baked into lora_b (file lora_alpha {alpha:g}, r {R})")
        cfg = {"r": R, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
               "target_modules": sorted(targets), "use_dora": dora == {True}}
        path.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, path / WEIGHTS[0])
        (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        adapter.notes.extend(notes)
        return [path / WEIGHTS[0], path / CONFIG]


