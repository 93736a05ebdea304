"""PEFT's methods other than LoRA: LoHa, LoKr, IA³, VeRA, AdaLoRA, OFT, BOFT, MiSS (and Bone, its former name),
read into deltas that merge exactly as PEFT's `merge_and_unload()` does; and the methods whose effect is no
weight update (prompt / prefix / p-tuning, X-LoRA ...), refused with the reason. Spec: formats/peft.md.

`read_method` is called by the PEFT reader (formats/peft.py) for every `peft_type` but LORA."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraport.adapter import Adapter, Delta, LoraDelta, ReplaceDelta
from loraport.deltas_lycoris import Ia3Delta, LohaDelta, LokrDelta
from loraport.deltas_peft import (MissDelta, OrthoDelta, VeraDelta, block_size_of, boft_blocks, oft_blocks,
                                  vera_projections)
from loraport.errors import BadInputError
from loraport.patterns import Deadline, PatternTable
from loraport.tensorfile import load_tensors

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# methods whose effect is not a change of weights: nothing to fold into the base
NOT_FOLDABLE = {
    "PROMPT_TUNING": "prompt tuning learns virtual tokens prepended to every input, not a weight update",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning learns virtual tokens prepended to every input, not a "
                               "weight update",
    "P_TUNING": "p-tuning learns virtual-token embeddings (from a prompt encoder) prepended to every input, not "
                "a weight update",
    "PREFIX_TUNING": "prefix tuning learns key/value prefixes that every attention layer attends to, not a "
                     "weight update",
    "ADAPTION_PROMPT": "LLaMA-Adapter adds gated attention to learned prompts inside the layers, not a weight "
                       "update",
    "CPT": "context-aware prompt tuning learns input tokens, not a weight update",
    "CARTRIDGE": "cartridges are a learned KV-cache prefix, not a weight update",
    "XLORA": "X-LoRA mixes its LoRA experts per token with a learned classifier, so no single weight update "
             "exists; merge one of its LoRA adapters instead",
    "POLY": "Poly routes between LoRA skills per task at run time, so no single weight update exists",
}

# parameter names each method saves per module (the adapter name, and `.weight` for OFT, may follow)
PARAMS = {
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1_a", "lokr_w1_b", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_w2", "lokr_t2"),
    "IA3": ("ia3_l",),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "OFT": ("oft_R",),
    "BOFT": ("boft_R", "boft_s"),
    "MISS": ("miss_block",),
    "BONE": ("bone_block",),
}
# a key holding one of these (and not understood) is an adapter tensor we would otherwise drop
_ADAPTER_HINT = re.compile(r"(^|\.)(hada_|lokr_|ia3_|vera_|lora_|oft_|boft_|miss_|bone_|token_adapter)")
_SHARED_VERA = re.compile(r"^base_model\.(vera_A|vera_B)(?:\.[^.]+)?$")


@dataclass
class _Ctx:
    """What every method's builder needs: the config, its per-module patterns, the base (or None), messages."""

    cfg: dict
    where: str
    base: object = None
    notes: list[str] = field(default_factory=list)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    rank_pattern: PatternTable | None = None
    alpha_pattern: PatternTable | None = None

    def num(self, key: str, default, positive: bool = False):
        v = self.cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise BadInputError(f"{self.where}: {key} must be a {'positive ' if positive else ''}number, got {v!r}")
        return v

    @staticmethod
    def _pattern(table: PatternTable | None, mod: str, default):
        return default if table is None else table.positive(mod, default)

    def r_alpha(self, mod: str, alpha_key: str = "alpha") -> tuple[float, float]:
        r = self._pattern(self.rank_pattern, mod, self.num("r", 8, positive=True))
        alpha = self._pattern(self.alpha_pattern, mod, self.num(alpha_key, 8))
        return r, alpha


def _need(ctx: _Ctx, mod: str, p: dict, *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in p]
    if missing:
        raise BadInputError(f"{ctx.where}: module {mod} lacks {', '.join(missing)}")
    return [p[n] for n in names]


def _fit(ctx: _Ctx, mod: str, p: dict, *rules: tuple[str, int, str, int]) -> None:
    """Each rule (a, i, b, j): p[a].shape[i] == p[b].shape[j] (and both are matrices or cores as stored), so a
    tampered factor is refused here rather than failing inside a matmul."""
    for a, i, b, j in rules:
        ta, tb = p[a], p[b]
        if ta.dim() not in (2, 4) or tb.dim() not in (2, 4) or max(i, j) >= min(ta.dim(), tb.dim()) or \
                ta.shape[i] != tb.shape[j]:
            raise BadInputError(f"{ctx.where}: {mod}: {a} {list(ta.shape)} does not fit {b} {list(tb.shape)}")


# ------------------------------------------------------------------------------------------ method builders
def _loha(ctx: _Ctx, mod: str, p: dict) -> list[Delta]:
    w1a, w1b, w2a, w2b = _need(ctx, mod, p, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if ("hada_t1" in p) != ("hada_t2" in p):
        raise BadInputError(f"{ctx.where}: module {mod} has only one of hada_t1 / hada_t2")
    if "hada_t1" in p:  # Tucker: t [r, r, kh, kw], a [r, out], b [r, in]
        _fit(ctx, mod, p, ("hada_t1", 0, "hada_w1_a", 0), ("hada_t1", 1, "hada_w1_b", 0),
             ("hada_t2", 0, "hada_w2_a", 0), ("hada_t2", 1, "hada_w2_b", 0), ("hada_w1_a", 1, "hada_w2_a", 1),
             ("hada_w1_b", 1, "hada_w2_b", 1), ("hada_t1", 2, "hada_t2", 2), ("hada_t1", 3, "hada_t2", 3))
        if p["hada_t1"].dim() != 4 or any(p[k].dim() != 2 for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a")):
            raise BadInputError(f"{ctx.where}: {mod}: Tucker LoHa has 4-D hada_t1/t2 and matrix factors")
    else:  # a [out, r], b [r, in]
        _fit(ctx, mod, p, ("hada_w1_a", 1, "hada_w1_b", 0), ("hada_w2_a", 1, "hada_w2_b", 0),
             ("hada_w1_a", 0, "hada_w2_a", 0), ("hada_w1_b", 1, "hada_w2_b", 1))
        if any(p[k].dim() != 2 for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            raise BadInputError(f"{ctx.where}: {mod}: LoHa factors without hada_t1/t2 are matrices")
    r, alpha = ctx.r_alpha(mod)
    return [LohaDelta(f"{mod}.weight", w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, t1=p.get("hada_t1"), t2=p.get("hada_t2"),
                      scale=alpha / r, alpha=float(alpha), source_key=PREFIX + mod)]


def _lokr(ctx: _Ctx, mod: str, p: dict) -> list[Delta]:
    _lokr_fits(ctx, mod, p)
    r, alpha = ctx.r_alpha(mod)  # PEFT scales by alpha/r even where both Kronecker factors are full
    return [LokrDelta(f"{mod}.weight", w1=p.get("lokr_w1"), w1a=p.get("lokr_w1_a"), w1b=p.get("lokr_w1_b"),
                      w2=p.get("lokr_w2"), w2a=p.get("lokr_w2_a"), w2b=p.get("lokr_w2_b"), t2=p.get("lokr_t2"),
                      scale=alpha / r, alpha=float(alpha), source_key=PREFIX + mod)]


def _lokr_fits(ctx: _Ctx, mod: str, p: dict) -> None:
    full1, full2 = "lokr_w1" in p, "lokr_w2" in p
    if full1 == ("lokr_w1_a" in p and "lokr_w1_b" in p) or full2 == ("lokr_w2_a" in p and "lokr_w2_b" in p):
        raise BadInputError(f"{ctx.where}: module {mod} needs lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b")
    if (full1 and p["lokr_w1"].dim() != 2) or (full2 and p["lokr_w2"].dim() not in (2, 3, 4)):
        raise BadInputError(f"{ctx.where}: {mod}: lokr_w1 is a matrix and lokr_w2 a matrix or conv kernel")
    if not full1:
        _fit(ctx, mod, p, ("lokr_w1_a", 1, "lokr_w1_b", 0))
    if not full2 and "lokr_t2" in p:  # Tucker: t [r, r, kh, kw], a [r, out_k], b [r, in_n]
        _fit(ctx, mod, p, ("lokr_t2", 0, "lokr_w2_a", 0), ("lokr_t2", 1, "lokr_w2_b", 0))
    elif not full2:
        _fit(ctx, mod, p, ("lokr_w2_a", 1, "lokr_w2_b", 0))
    if not full1 and p["lokr_w1_a"].dim() != 2 or not full2 and p["lokr_w2_a"].dim() != 2:
        raise BadInputError(f"{ctx.where}: {mod}: lokr_w1_a/b and lokr_w2_a/b are matrices")


def _ia3(ctx: _Ctx, mod: str, p: dict) -> list[Delta]:
    (v,) = _need(ctx, mod, p, "ia3_l")
    if v.dim() == 4 and v.shape[0] == 1 and tuple(v.shape[2:]) == (1, 1):  # conv: [1, n, 1, 1] either way
        on_input = _feedforward(ctx, mod)
    elif v.dim() == 2 and 1 in v.shape:
        on_input = v.shape[0] == 1 and v.shape[1] != 1  # [1, in]: a feedforward layer scales its inputs
    else:
        raise BadInputError(f"{ctx.where}: {mod}.ia3_l {list(v.shape)} is not a [out, 1] / [1, in] vector or a "
                            "[1, channels, 1, 1] conv scale (IA³ on embeddings or Conv3d is not supported)")
    vec = v.reshape(-1).float() - 1.0  # W' = W ⊙ l  ==  W + W ⊙ (l − 1)
    out = [Ia3Delta(f"{mod}.weight", vector=vec, on_input=on_input, source_key=PREFIX + mod + ".ia3_l")]
    if not on_input and _base_names(ctx.base, f"{mod}.bias"):  # PEFT scales the bias of a non-feedforward layer
        out.append(Ia3Delta(f"{mod}.bias", vector=vec, source_key=PREFIX + mod + ".ia3_l"))
    return out


def _feedforward(ctx: _Ctx, mod: str) -> bool:
    """PEFT's rule for a list of `feedforward_modules`: the module path ends with one of them."""
    ff = ctx.cfg.get("feedforward_modules") or []
    if isinstance(ff, str) or not all(isinstance(k, str) for k in ff):
        raise BadInputError(f"{ctx.where}: feedforward_modules {str(ff)[:60]!r} is not a list of module names "
                            "(a regex there is not supported for conv IA³, whose vector shape does not say)")
    return any(mod.endswith(k) for k in ff)


def _base_names(base, name: str) -> list[str]:
    """The base tensors `name` resolves to (the engine's fall-backs), none without a base."""
    if base is None:
        return []
    from loraport.engine.sources import resolve_target

    return resolve_target(base, name)


def _vera(ctx: _Ctx, mod: str, p: dict) -> list[Delta]:
    lb, ld = _need(ctx, mod, p, "vera_lambda_b", "vera_lambda_d")
    A, B = ctx.shared.get("vera_A"), ctx.shared.get("vera_B")
    if A is None or B is None:
        raise BadInputError(
            f"{ctx.where}: the VeRA projections vera_A / vera_B are not saved (save_projection=False) and there "
            "is no base to size them from projection_prng_key: give the base (merge, or convert --base), or "
            "re-save the adapter with VeraConfig(save_projection=True)")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or ld.numel() != A.shape[0] or lb.dim() != 1:
        raise BadInputError(f"{ctx.where}: {mod}: VeRA shapes disagree: vera_A {list(A.shape)}, vera_B "
                            f"{list(B.shape)}, lambda_d {list(ld.shape)}, lambda_b {list(lb.shape)}")
    d = VeraDelta(f"{mod}.weight", A=A, B=B, lambda_b=lb, lambda_d=ld.reshape(-1), source_key=PREFIX + mod)
    names = _base_names(ctx.base, d.target)
    if names:  # the base gives the input width: a plain LoRA from here on (convert writes it as one, exactly)
        return [d.resolve(tuple(ctx.base.info(names[0]).shape), ctx.base.layer_hint(names[0]))]
    return [d]


def _regenerate_vera(ctx: _Ctx, parts: dict[str, dict]) -> dict[str, torch.Tensor]:
    """vera_A / vera_B as PEFT redraws them (save_projection=False), sized by the largest targeted layer of the
    base (PEFT's _find_dim over the same modules); {} when a target is missing (the plan then says so)."""
    n_in = n_out = 0
    for mod in parts:
        names = _base_names(ctx.base, f"{mod}.weight")
        if not names or len(shape := tuple(ctx.base.info(names[0]).shape)) != 2:
            return {}
        o, i = (shape[1], shape[0]) if ctx.base.layer_hint(names[0]) == "conv1d" else shape
        n_in, n_out = max(n_in, i), max(n_out, o)
    seed = ctx.num("projection_prng_key", 0)
    if isinstance(seed, float) or seed < 0:
        raise BadInputError(f"{ctx.where}: projection_prng_key must be a non-negative integer, got {seed!r}")
    A, B = vera_projections(int(ctx.num("r", 256, positive=True)), n_in, n_out, seed)
    ctx.notes.append(f"VeRA projections regenerated from projection_prng_key={seed} (not saved in the adapter)")
    return {"vera_A": A, "vera_B": B}


def _adalora(ctx: _Ctx, mod: str, p: dict) -> list[Delta]:
    A, B, E = _need(ctx, mod, p, "lora_A", "lora_B", "lora_E")
    r = int(A.shape[0]) if A.dim() == 2 else -1
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r or E.numel() != r:
        raise BadInputError(f"{ctx.where}: {mod}: AdaLoRA shapes disagree: lora_A {list(A.shape)}, lora_B "
                            f"{list(B.shape)}, lora_E {list(E.shape)}")
    init_r = ctx.num("init_r", 12, positive=True)
    alpha = ctx.num("lora_alpha", 8)
    alpha = alpha if alpha > 0 else float(r)  # PEFT: scaling = lora_alpha, or the rank when alpha ≤ 0
    # ΔW = B @ (A ⊙ E) · alpha / (ranknum + 1e-5); ranknum is init_r (an fp32 buffer, kept when pruned)
    ranknum = float(torch.tensor(float(init_r), dtype=torch.float32) + 1e-5)
    AE = A.float() * E.float().reshape(-1, 1)
    return [LoraDelta(f"{mod}.weight", A=AE, B=B, scale=alpha / ranknum if r else 0.0, transpose=None,
                      alpha=float(alpha), scale_rule="alpha/(init_r+1e-5)", source_key=PREFIX + mod)]


def _oft(ctx: _Ctx, mod: str, p: dict) -> list[Delta]:
    (w,) = _need(ctx, mod, p, "oft_R")
    b = block_size_of(int(w.shape[1])) if w.dim() == 2 else None
    if b is None or b < 2:
        raise BadInputError(f"{ctx.where}: {mod}.oft_R {list(w.shape)} is not [blocks, b(b-1)/2] (OFT from PEFT "
                            "< 0.15 stored full matrices: re-save it with a current PEFT)")
    shared = bool(ctx.cfg.get("block_share", False))
    if shared and w.shape[0] != 1:
        raise BadInputError(f"{ctx.where}: {mod}: block_share with {w.shape[0]} blocks (expected 1)")
    terms = int(ctx.num("num_cayley_neumann_terms", 5, positive=True))
    blocks = oft_blocks(w, b, neumann=bool(ctx.cfg.get("use_cayley_neumann", True)), terms=terms,
                        coft=bool(ctx.cfg.get("coft", False)), eps=float(ctx.num("eps", 6e-5)))
    return [OrthoDelta(f"{mod}.weight", blocks=blocks, shared=shared, params=w.numel(), method="oft",
                       source_key=PREFIX + mod + ".oft_R")]


def _boft(ctx: _Ctx, mod: str, p: dict) -> list[Delta]:
    R, s = _need(ctx, mod, p, "boft_R", "boft_s")
    if R.dim() != 4 or R.shape[2] != R.shape[3] or s.dim() != 2 or s.shape[1] != 1:
        raise BadInputError(f"{ctx.where}: {mod}: boft_R {list(R.shape)} / boft_s {list(s.shape)} are not "
                            "[factors, blocks, b, b] / [out, 1]")
    if R.shape[0] != 1:
        raise BadInputError(f"{ctx.where}: {mod}: BOFT with boft_n_butterfly_factor {R.shape[0]} > 1 (butterfly "
                            "permutations) is not supported; only factor 1 (block-diagonal) adapters merge")
    return [OrthoDelta(f"{mod}.weight", blocks=boft_blocks(R), out_scale=s, params=R.numel() + s.numel(),
                       method="boft", source_key=PREFIX + mod + ".boft_R")]


def _miss(ctx: _Ctx, mod: str, p: dict) -> list[Delta]:
    method = "bone" if "bone_block" in p else "miss"
    (blk,) = _need(ctx, mod, p, f"{method}_block")
    init = ctx.cfg.get("init_weights", True)
    mode = init if init in ("bat", "mini") else "tile"
    if blk.dim() != (3 if mode == "bat" else 2):
        raise BadInputError(f"{ctx.where}: {mod}.{method}_block {list(blk.shape)} does not fit init_weights="
                            f"{init!r}")
    if mode == "mini" and blk.shape[1] != ctx.num("mini_r", 1, positive=True):
        raise BadInputError(f"{ctx.where}: {mod}.{method}_block {list(blk.shape)} disagrees with mini_r")
    return [MissDelta(f"{mod}.weight", block=blk, mode=mode, method=method,
                      source_key=f"{PREFIX}{mod}.{method}_block")]


BUILDERS: dict[str, Callable[[_Ctx, str, dict], list[Delta]]] = {
    "LOHA": _loha, "LOKR": _lokr, "IA3": _ia3, "VERA": _vera, "ADALORA": _adalora, "OFT": _oft, "BOFT": _boft,
    "MISS": _miss, "BONE": _miss,
}
SUPPORTED = ("LORA", *BUILDERS)


# ------------------------------------------------------------------------------------------------- reading
def check_type(ptype: str, path: Path) -> None:
    """Refuse a `peft_type` loraport cannot merge, saying why."""
    if ptype in NOT_FOLDABLE:
        raise BadInputError(f"{path}: PEFT {ptype} cannot be merged into weights: {NOT_FOLDABLE[ptype]}")
    if ptype not in SUPPORTED:
        raise BadInputError(f"{path}: PEFT method {ptype} is not supported yet; loraport merges "
                            f"{', '.join(SUPPORTED)}")


def _sort(ptype: str, tensors: dict[str, torch.Tensor], ctx: _Ctx):
    """(module → parameters, replacement tensors by target, keys not understood); VeRA's shared projections go
    to ctx.shared."""
    names = "|".join(PARAMS[ptype])
    key_re = re.compile(rf"^(?P<mod>.+?)\.(?P<p>{names})(?:\.[^.]+)?(?:\.weight)?$")
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    replacements: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        shared = _SHARED_VERA.match(key)
        if shared and ptype == "VERA":
            ctx.shared[shared.group(1)] = t
            continue
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = key_re.match(k)
        if m is not None:
            parts[m.group("mod")][m.group("p")] = t
        elif _ADAPTER_HINT.search(k):
            unknown.append(key)
        else:  # modules_to_save / trainable biases: full tensors, possibly still wrapped
            k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
            replacements[re.sub(r"\.original_module\.", ".", k)] = t
    return parts, replacements, unknown


def read_method(path: Path, cfg: dict, base, ptype: str) -> Adapter:
    """An Adapter for a PEFT folder of method `ptype` (checked by `check_type`)."""
    check_type(ptype, path)
    wfile = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
    if wfile is None:
        raise BadInputError(f"{path}: missing {WEIGHTS[0]} (or legacy {WEIGHTS[1]})")
    tensors, meta = load_tensors(wfile)
    where = str(path / CONFIG)
    deadline = Deadline()
    ctx = _Ctx(cfg, where, base,
               rank_pattern=PatternTable(cfg.get("rank_pattern"), "rank_pattern", where, deadline)
               if ptype in ("LOHA", "LOKR") else None,
               alpha_pattern=PatternTable(cfg.get("alpha_pattern"), "alpha_pattern", where, deadline)
               if ptype in ("LOHA", "LOKR") else None)
    parts, replacements, unknown = _sort(ptype, tensors, ctx)
    if ptype == "VERA" and not ctx.shared and base is not None:
        ctx.shared.update(_regenerate_vera(ctx, parts))
    if unknown:
        raise BadInputError(f"{wfile}: entries that are not {ptype} parameters (e.g. {unknown[0]}); only "
                            f"{', '.join(PARAMS[ptype])}, modules_to_save and trainable biases are understood")
    if not parts:
        raise BadInputError(f"{wfile}: no {ptype} parameters ({', '.join(PARAMS[ptype])}) in the file")
    deltas: list[Delta] = []
    for mod, p in parts.items():
        deltas += BUILDERS[ptype](ctx, mod, p)
    deltas += [ReplaceDelta(k, value=t, source_key=PREFIX + k) for k, t in replacements.items()]
    notes = [f"PEFT {ptype}: {len(parts)} module(s), merged as PEFT's merge_and_unload does", *ctx.notes]
    if replacements:
        notes.append(f"{len(replacements)} full replacement tensor(s) (modules_to_save / trainable biases)")
    return Adapter(deltas, "peft", str(path), config=cfg, metadata=meta, notes=notes,
                   files=[str(path / CONFIG), str(wfile)], name=path.name)
