"""Extract, resize and combine LoRA adapters: adapter-level operations built on `loraport.decompose`.

* `extract_adapter(base, tuned, ...)`: ΔW = W_tuned − W_base per matching 2-D / conv tensor, streamed one pair
  at a time from the two checkpoints' memory maps, factored by a truncated SVD;
* `resize_adapter(adapter, ...)`: the exact SVD of each scale·B·A from its thin factors, truncated;
* `combine_adapters(adapters, weights, method, ...)`: `cat` (exact, ranks add), `svd` (the exact weighted sum
  re-factorized), `ties` / `dare` (dense per-layer merges per their papers, then re-factorized);
* `extract` / `resize` / `combine`: the same with files in and files out (atomic, refused if present).

Every per-layer result carries its relative Frobenius error against the exact update it approximates,
measured on the factors as written (after rounding to the output dtype); resize/svd also give the optimum.
Factors are written balanced (B = U√σ, A = √σVᵀ) with scale 1 (alpha = rank); `cat` keeps PEFT's layout
(wᵢ·scaleᵢ folded into Aᵢ, Bᵢ as is), so its output equals PEFT's `add_weighted_adapter(..., "cat")`.

Size: three adapter-level operations (extract, resize, combine) sharing `RankSpec` and the factor helpers;
one module per operation is the way to split it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from loraport import decompose as dc
from loraport.adapter import Adapter, Delta, LoraDelta
from loraport.errors import BadInputError, PlanError

# nn.Embedding weights [num, dim]: PEFT keeps their LoRA transposed (lora_embedding_A [r, num]), so an
# extracted update for these is factored as ΔWᵀ and marked transpose=True. One line per spelling.
EMBEDDING_NAMES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)embed_tokens\.weight$", "Llama, Mistral, Qwen2, Gemma, OPT, BART"),
    (r"(^|\.)wte\.weight$", "GPT-2, GPT-J"),
    (r"(^|\.)wpe\.weight$", "GPT-2 positions"),
    (r"(^|\.)word_embeddings\.weight$", "BERT, BLOOM, Falcon"),
    (r"(^|\.)embed_in\.weight$", "GPT-NeoX, Pythia"),
    (r"(^|\.)embed_positions\.weight$", "OPT, BART positions"),
    (r"(^|\.)position_embeddings\.weight$", "BERT, CLIP text positions"),
    (r"(^|\.)token_type_embeddings\.weight$", "BERT"),
    (r"(^|\.)token_embedding\.weight$", "CLIP text"),
)
_EMBEDDING = re.compile("|".join(p for p, _ in EMBEDDING_NAMES))
_HAS_LAYER = "layer" in {f.name for f in fields(LoraDelta)}
METHODS = ("cat", "svd", "ties", "dare")
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5}  # TIES paper: keep the top 20%; DARE: drop half, rescale ×2


@dataclass(frozen=True)
class RankSpec:
    """How many singular directions to keep per layer: a fixed `rank`, or the fewest retaining `energy`
    (fraction of Σσ²), optionally capped by `max_rank`."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None

    def check(self, required: bool = True) -> RankSpec:
        if self.rank is not None and self.energy is not None:
            raise BadInputError("give either --rank or --energy, not both")
        if required and self.rank is None and self.energy is None:
            raise BadInputError("give --rank N or --energy F (e.g. --rank 32 or --energy 0.95)")
        if self.rank is not None and self.rank < 1:
            raise BadInputError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise BadInputError(f"--energy must be in (0, 1], got {self.energy}")
        if self.max_rank is not None and self.max_rank < 1:
            raise BadInputError(f"--max-rank must be at least 1, got {self.max_rank}")
        if self.max_rank is not None and self.rank is not None:
            raise BadInputError("--max-rank caps a rank loraport picks (--energy, combine's default); with --rank "
                                "give the rank you want instead")
        return self

    def describe(self) -> dict:
        return {"rank": self.rank, "energy": self.energy, "max_rank": self.max_rank}


# --- factors ---------------------------------------------------------------------------------------
def thin_factors(d: LoraDelta, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, n]) in fp32 on `device` with B @ A = scale·ΔW as a matrix in the delta's own
    frame (B@A before any transpose; conv kernels flattened to [out, in·kh·kw]; a Tucker core folded in)."""
    return d.thin_factors(device)


def from_factors(like: LoraDelta, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype | None = None,
                 **changes) -> LoraDelta:
    """A plain LoRA delta (scale 1, alpha = rank) in `like`'s frame from matrix factors B [out,k], A [k,n]."""
    shape = like._product_shape()
    k = int(A.shape[0])
    if len(shape) > 2:
        A = A.reshape(k, *shape[1:])
        B = B.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    dt = dtype or like.A.dtype
    out = replace(like, A=A.to("cpu", dt).contiguous(), B=B.to("cpu", dt).contiguous(), scale=1.0, mid=None,
                  alpha=float(k), scale_rule="alpha/r", **changes)
    return out


def make_lora(target: str, B: torch.Tensor, A: torch.Tensor, shape: tuple[int, ...], *, transpose: bool,
              layer: str | None, dtype: torch.dtype) -> LoraDelta:
    """A LoRA delta for `target` whose product B@A has kernel `shape` ([out, in] or [out, in, kh, kw])."""
    k = int(A.shape[0])
    if len(shape) > 2:
        A = A.reshape(k, *shape[1:])
        B = B.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    kw = {"layer": layer} if _HAS_LAYER else {}
    return LoraDelta(target, A=A.to("cpu", dtype).contiguous(), B=B.to("cpu", dtype).contiguous(), scale=1.0,
                     transpose=transpose, alpha=float(k), scale_rule="alpha/r", source_key=target, **kw)


def _loras(adapter: Adapter, what: str) -> None:
    if not any(d.has_lora_factors for d in adapter.deltas):
        raise BadInputError(f"{adapter.path or adapter.name}: no LoRA factors to {what}")


# --- resize ----------------------------------------------------------------------------------------
def resize_adapter(adapter: Adapter, spec: RankSpec, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[Adapter, dict]:
    """Every LoRA delta re-factored at the rank `spec` asks for, from the exact SVD of scale·B·A (computed
    from the thin factors). DoRA magnitudes are kept as they are (the direction update is truncated);
    non-LoRA deltas are passed through untouched."""
    spec.check()
    _loras(adapter, "resize")
    out: list[Delta] = []
    layers = []
    notes = list(adapter.notes)
    for d in adapter.deltas:
        if not d.has_lora_factors:
            out.append(d)
            notes.append(f"{d.target}: {d.kind} update kept as is")
            continue
        t0 = time.perf_counter()
        B, A = thin_factors(d, device)
        svd = dc.lowrank_svd(B, A)
        k = max(1, dc.pick_rank(svd.S, spec.rank, spec.energy, spec.max_rank))
        B2, A2 = svd.factors(k)
        new = from_factors(d, B2, A2, dtype)
        out.append(new)
        opt = svd.tail_error(k)
        err = dc.lowrank_rel_error(B, A, *thin_factors(new, device))  # as written (incl. dtype rounding)
        layers.append({"target": d.target, "rank_in": d.rank(), "rank_out": k, "rel_error": err,
                       "optimal_error": opt, "energy_kept": 1 - opt * opt, "dora": d.has_magnitude,
                       "seconds": time.perf_counter() - t0})
    if any(x["dora"] for x in layers):
        notes.append("DoRA: magnitudes kept; rel_error is that of the direction update scale·B·A")
    res = replace(adapter, deltas=out, notes=notes)
    return res, {"layers": layers, **_summary(layers), "spec": spec.describe()}


def _summary(layers: list[dict]) -> dict:
    errs = [x["rel_error"] for x in layers]
    return {"num_layers": len(layers), "max_rel_error": max(errs, default=0.0),
            "mean_rel_error": sum(errs) / len(errs) if errs else 0.0}


# --- combine ---------------------------------------------------------------------------------------
def _aligned(ref: LoraDelta, d: LoraDelta, device) -> tuple[torch.Tensor, torch.Tensor]:
    """d's thin factors expressed in ref's frame (flipping a transposed 2-D delta when needed)."""
    B, A = thin_factors(d, device)
    want, have = tuple(ref._product_shape()), tuple(d._product_shape())
    flip_known = ref.transpose is not None and d.transpose is not None and bool(ref.transpose) != bool(d.transpose)
    if have == want and not flip_known:
        return B, A
    if len(have) == 2 and (have[1], have[0]) == want and (flip_known or have != want):
        return A.mT, B.mT  # (B A)ᵀ = Aᵀ Bᵀ
    raise PlanError(f"{ref.target}: the adapters disagree on its shape ({list(want)} vs {list(have)})")


def _group_loras(adapters: list[Adapter]) -> dict[tuple, list[tuple[int, LoraDelta]]]:
    """(target, rows) -> [(adapter index, delta)], refusing anything but LoRA factors without DoRA."""
    groups: dict[tuple, list[tuple[int, LoraDelta]]] = {}
    for i, ad in enumerate(adapters):
        _loras(ad, "combine")
        for d in ad.deltas:
            name = ad.path or ad.name or f"adapter {i + 1}"
            if not d.has_lora_factors:
                raise BadInputError(f"{name}: {d.target} is a {d.kind} update; combine works on LoRA factors only")
            if d.has_magnitude:
                raise BadInputError(f"{name}: {d.target} is DoRA; magnitudes cannot be combined (merge instead)")
            groups.setdefault((d.target, d.rows), []).append((i, d))
    return groups


def combine_adapters(adapters: list[Adapter], weights: list[float], method: str, spec: RankSpec | None = None,
                     density: float | None = None, seed: int = 0, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> tuple[Adapter, dict]:
    """One adapter whose update approximates Σ wᵢ·ΔWᵢ per target. `cat` is exact (ranks add, PEFT's layout);
    `svd` re-factorizes the exact sum at the rank `spec` gives (default, as PEFT: the largest rank of
    any input); `ties`/`dare` merge the dense per-layer updates (trim + sign election + disjoint mean; random
    drop with a seeded mask + rescale), then re-factorize. Every layer reports its error against the exact
    weighted sum."""
    if method not in METHODS:
        raise BadInputError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if len(adapters) != len(weights):
        raise BadInputError(f"{len(adapters)} adapters but {len(weights)} weights")
    spec = (spec or RankSpec()).check(required=False)
    if method == "cat" and (spec.rank is not None or spec.energy is not None):
        raise BadInputError("--method cat is exact: its rank is the sum of the inputs' ranks (drop --rank/--energy)")
    if method in ("ties", "dare"):
        density = DEFAULT_DENSITY[method] if density is None else density
        if not 0 < density <= 1:
            raise BadInputError(f"--density must be in (0, 1], got {density}")
    groups = _group_loras(adapters)
    # PEFT's default for svd/ties/dare: the largest rank of any input, for every layer
    default_rank = max((d.rank() or 0 for ms in groups.values() for _, d in ms), default=1)
    fixed = spec.rank if (spec.rank or spec.energy) else default_rank
    out: list[Delta] = []
    layers = []
    for (target, _rows), members in groups.items():
        t0 = time.perf_counter()
        ref = members[0][1]
        thin = [(i, *_aligned(ref, d, device)) for i, d in members]
        ws = [float(weights[i]) for i, _ in members]
        B_cat = torch.cat([B for _, B, _ in thin], 1)
        A_cat = torch.cat([A * w for (_, _, A), w in zip(thin, ws)], 0)  # exact: B_cat @ A_cat = Σ w·ΔW
        row = {"target": target, "inputs": [i for i, _ in members], "rank_in": [d.rank() for _, d in members]}
        if method == "cat":
            B2, A2, extra = B_cat, A_cat, {}
        elif method == "svd":
            svd = dc.lowrank_svd(B_cat, A_cat)
            k = max(1, dc.pick_rank(svd.S, fixed, spec.energy, spec.max_rank))
            B2, A2 = svd.factors(k)
            extra = {"optimal_error": svd.tail_error(k)}
        else:
            dense = [B @ A for _, B, A in thin]  # scaleᵢ·ΔWᵢ, unweighted
            if method == "ties":
                merged = dc.ties_merge(dense, ws, density)
            else:
                seeds = [dc.layer_seed(seed, i, target) for i, _ in members]
                merged = dc.dare_merge(dense, ws, density, seeds)
            svd, k = dc.truncated_svd(merged, fixed, spec.energy, spec.max_rank, seed=seed)
            k = max(1, k)
            B2, A2 = svd.factors(k)
            extra = {"merge_error": dc.relative_error(B_cat @ A_cat, merged),
                     "trunc_error": dc.relative_error(merged, B2 @ A2)}
        dt = dtype or ref.A.dtype
        new = from_factors(ref, B2, A2, dt, source_key=target)
        out.append(new)
        # against the exact weighted sum, as written (after rounding to the output dtype)
        err = dc.lowrank_rel_error(B_cat, A_cat, *thin_factors(new, device))
        row.update(rank_out=int(A2.shape[0]), rel_error=err, seconds=time.perf_counter() - t0, **extra)
        layers.append(row)
    notes = [f"combined with --method {method}, weights {weights}"]
    info = {"method": method, "weights": list(weights), "spec": spec.describe()}
    if method in ("ties", "dare"):
        info["density"] = density
        notes.append(f"density {density}" + (f", seed {seed}" if method == "dare" else ""))
    if method == "dare":
        info["seed"] = seed
    first = adapters[0]
    res = Adapter(out, first.format, "", config=dict(first.config), notes=notes, name="combined")
    return res, {"layers": layers, **_summary(layers), **info}


# --- extract ---------------------------------------------------------------------------------------
def extract_adapter(base, tuned, spec: RankSpec, device: torch.device | str = "cpu", method: str = "auto",
                    seed: int = 0, dtype: torch.dtype | None = None, include: str | None = None,
                    exclude: str | None = None, on_layer=None) -> tuple[Adapter, dict]:
    """LoRA factors for W_tuned − W_base of every matching 2-D / conv tensor that changed. `base` and
    `tuned` are `Checkpoint`s; one pair of tensors is in memory at a time. `on_layer(name, numel)` is
    called after each tensor (progress)."""
    spec.check()
    inc = _regex(include, "--include")
    exc = _regex(exclude, "--exclude")
    dev = torch.device(device)
    deltas: list[Delta] = []
    layers, skipped, unchanged, not_lora = [], [], [], []
    tied_skip = tuned.tied() and any(n.endswith("lm_head.weight") for n in tuned.names())
    for name in tuned.names():
        info = tuned.info(name)
        numel = 1
        for s in info.shape:
            numel *= s
        if not info.dtype.is_floating_point or (inc and not inc.search(name)) or (exc and exc.search(name)):
            continue
        if name not in base:
            skipped.append({"target": name, "why": "not in the base"})
            continue
        binfo = base.info(name)
        if tuple(binfo.shape) != tuple(info.shape):
            skipped.append({"target": name, "why": f"shape {list(info.shape)} vs base {list(binfo.shape)}"})
            continue
        t0 = time.perf_counter()
        Wt = tuned.get(name).to(device=dev, dtype=torch.float32)
        D = Wt - base.get(name).to(device=dev, dtype=torch.float32)
        del Wt
        if not bool(D.any()):
            unchanged.append(name)
            _tick(on_layer, name, numel)
            continue
        if D.dim() < 2 or D.dim() > 5:
            not_lora.append({"target": name, "shape": list(D.shape),
                             "rel_change": _rel(D, base.get(name))})
            _tick(on_layer, name, numel)
            continue
        if tied_skip and name.endswith("lm_head.weight"):
            skipped.append({"target": name, "why": "tied to the input embeddings (extracted there)"})
            continue
        hint = tuned.layer_hint(name)
        emb = D.dim() == 2 and bool(_EMBEDDING.search(name))
        transpose = hint == "conv1d" or emb
        M = D.mT if transpose else dc.as_matrix(D)
        svd, k = dc.truncated_svd(M, spec.rank, spec.energy, spec.max_rank, method=method, seed=seed)
        k = max(1, k)
        B, A = svd.factors(k)
        shape = (M.shape[0], M.shape[1]) if transpose or D.dim() == 2 else tuple(D.shape)
        layer = "embedding" if emb else ("conv1d" if hint == "conv1d" else ("conv" if D.dim() > 2 else None))
        new = make_lora(name, B, A, shape, transpose=transpose, layer=layer, dtype=dtype or info.dtype)
        deltas.append(new)
        Bw, Aw = thin_factors(new, dev)  # the factors as written: the error includes the dtype rounding
        err = dc.relative_error(M, Bw @ Aw)
        layers.append({"target": name, "shape": list(D.shape), "rank": k, "method": svd.method,
                       "rel_error": err, "norm": float(torch.linalg.vector_norm(M)),
                       "seconds": time.perf_counter() - t0})
        del D, M, svd
        _tick(on_layer, name, numel)
    if not deltas:
        raise BadInputError(f"{tuned.root}: no 2-D or conv tensor differs from the base {base.root}; "
                            "nothing to extract")
    notes = []
    if not_lora:
        notes.append(f"{len(not_lora)} changed tensor(s) are not matrices (biases, norms) and were not "
                     f"extracted, e.g. {not_lora[0]['target']}")
    ad = Adapter(deltas, "peft", "", config={}, notes=notes, name="extracted")
    report = {"layers": layers, **_summary(layers), "spec": spec.describe(), "svd": method, "seed": seed,
              "unchanged": len(unchanged), "skipped": skipped, "not_extracted": not_lora,
              "params": ad.num_params()}
    return ad, report


def _tick(cb, name, numel):
    if cb is not None:
        cb(name, numel)


def _rel(D: torch.Tensor, W: torch.Tensor) -> float:
    n = float(torch.linalg.vector_norm(W.float()))
    return float(torch.linalg.vector_norm(D)) / n if n > 0 else float("inf")


def _regex(pat: str | None, flag: str):
    if not pat:
        return None
    try:
        return re.compile(pat)
    except re.error as e:
        raise BadInputError(f"{flag} {pat!r} is not a valid regular expression ({e})") from None


# --- files in, files out ---------------------------------------------------------------------------
OUT_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _out_dtype(name: str) -> torch.dtype | None:
    if name not in OUT_DTYPES:
        raise BadInputError(f"unknown --dtype {name!r}; use one of {', '.join(OUT_DTYPES)}")
    return OUT_DTYPES[name]


def write_adapter(adapter: Adapter, out: str | Path, to: str, inputs: list, overwrite: bool = False,
                  base=None) -> list[str]:
    """Write `adapter` in format `to` at `out` through a temporary sibling renamed into place."""
    from loraport.outputs import check_output, staged_output

    fmt = writer(to, out)
    outp = check_output(out, inputs, overwrite)
    is_dir = fmt.writes_folder(outp)  # the format's declared layout (loraport/formats)
    with staged_output(outp, is_dir=is_dir, overwrite=overwrite) as stage:
        written = fmt.write(adapter, stage, base=base)
    return [str(outp / Path(w).name) if is_dir else str(outp) for w in (written or [])]


def writer(to: str, out: str | Path):
    """The format class for `to`, refused up front (before any work) when it cannot be written at `out`."""
    from loraport.formats import get_format

    fmt = get_format(to)
    if not fmt.writable:
        raise BadInputError(f"the {to} format cannot be written")
    if fmt.output_suffix and Path(out).suffix != fmt.output_suffix:
        raise BadInputError(f"a {to} adapter is one {fmt.output_suffix} file: give --out NAME{fmt.output_suffix}")
    return fmt


def extract(base: str | Path, tuned: str | Path, out: str | Path, *, rank: int | None = None,
            energy: float | None = None, max_rank: int | None = None, to: str = "peft", method: str = "auto",
            seed: int = 0, dtype: str = "auto", device: str = "auto", include: str | None = None,
            exclude: str | None = None, overwrite: bool = False, on_layer=None) -> dict:
    from loraport.checkpoint import Checkpoint
    from loraport.engine.device import pick_device

    spec = RankSpec(rank, energy, max_rank).check()
    if method not in ("auto", "full", "randomized"):
        raise BadInputError(f"unknown --svd {method!r}; use auto, full or randomized")
    from loraport.outputs import check_output

    check_output(out, [base, tuned], overwrite)
    writer(to, out)
    dev = pick_device(device)
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    try:
        t0 = time.perf_counter()
        ad, rep = extract_adapter(b, t, spec, dev, method, seed, _out_dtype(dtype), include, exclude, on_layer)
        rep["seconds"] = time.perf_counter() - t0
        rep["files"] = write_adapter(ad, out, to, [base, tuned], overwrite, base=b)
    finally:
        b.close()
        t.close()
    rep.update(out=str(out), format=to, device=str(dev), base=str(base), tuned=str(tuned))
    return rep


def _load(path, fmt: str | None, base_ckpt):
    from loraport.formats import load_adapter

    return load_adapter(path, format=fmt, base=base_ckpt)


def resize(adapter: str | Path, out: str | Path, *, rank: int | None = None, energy: float | None = None,
           max_rank: int | None = None, to: str | None = None, fmt: str | None = None, base: str | None = None,
           dtype: str = "auto", device: str = "auto", overwrite: bool = False) -> dict:
    from loraport.checkpoint import Checkpoint
    from loraport.engine.device import pick_device
    from loraport.outputs import check_output

    spec = RankSpec(rank, energy, max_rank).check()
    check_output(out, [adapter, base], overwrite)
    dev = pick_device(device)
    b = Checkpoint.open(base) if base else None
    try:
        ad = _load(adapter, fmt, b)
        to = to or _writable_or_peft(ad.format)
        writer(to, out)
        res, rep = resize_adapter(ad, spec, dev, _out_dtype(dtype))
        rep["files"] = write_adapter(res, out, to, [adapter, base], overwrite, base=b)
    finally:
        if b is not None:
            b.close()
    rep.update(out=str(out), format=to, input=str(adapter), input_format=ad.format, device=str(dev),
               params_in=ad.num_params(), params_out=res.num_params())
    return rep


def combine(adapters: list[str | Path], out: str | Path, *, weights: list[float] | None = None,
            method: str = "svd", rank: int | None = None, energy: float | None = None,
            max_rank: int | None = None, density: float | None = None, seed: int = 0, to: str | None = None,
            fmt: str | None = None, base: str | None = None, dtype: str = "auto", device: str = "auto",
            overwrite: bool = False) -> dict:
    from loraport.checkpoint import Checkpoint
    from loraport.engine.device import pick_device
    from loraport.outputs import check_output

    if len(adapters) < 2:
        raise BadInputError("combine needs at least two adapters")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    spec = RankSpec(rank, energy, max_rank).check(required=False)
    check_output(out, [*adapters, base], overwrite)
    dev = pick_device(device)
    b = Checkpoint.open(base) if base else None
    try:
        ads = [_load(p, fmt, b) for p in adapters]
        to = to or _writable_or_peft(ads[0].format)
        writer(to, out)
        res, rep = combine_adapters(ads, weights, method, spec, density, seed, dev, _out_dtype(dtype))
        rep["files"] = write_adapter(res, out, to, [*adapters, base], overwrite, base=b)
    finally:
        if b is not None:
            b.close()
    rep.update(out=str(out), format=to, inputs=[str(p) for p in adapters], device=str(dev))
    return rep


def _writable_or_peft(name: str) -> str:
    from loraport.formats import formats

    f = formats().get(name)
    return name if f is not None and f.writable else "peft"
