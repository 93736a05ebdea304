"""Convert an adapter from any readable format into another, without merging.

Lossless wherever the target can express the adapter: readers resolve every format's scale rule into a
per-module scale, and each writer either stores that scale natively (PEFT alpha_pattern, kohya .alpha) or
bakes it into B (formats with one alpha or one scale per file: MLX, GGUF, torchtune), zero-pads mixed ranks
where a format has a single rank, and so on — the writers refuse, naming what would be lost, when a delta has
no exact form (DoRA into GGUF, LoHa into plain LoRA, ...). `lossy=True` then re-factors the offending deltas
(or, with `rank`, every delta) by SVD to plain LoRA and reports the relative error of each.

After writing, the output is read back with the target format's reader and compared with what was meant to
be written, so the report's `max_abs_diff` is measured, not assumed.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from loraport.adapter import Adapter, Delta, LoraDelta
from loraport.paths import identity
from loraport.errors import BadInputError, Inexpressible



def convert_adapter(src: str | Path, to: str, out: str | Path, base: str | Path | None = None,
                    format: str | None = None, lossy: bool = False, rank: int | None = None,
                    overwrite: bool = False, device: str = "cpu", write_options: dict | None = None,
                    manifest: bool = False, hash_cache=True, **read_options) -> dict:
    """Read `src` (format auto-detected unless `format`; `read_options` go to the reader, e.g.
    mlx_alpha="apply"), write it as `to` at `out` (`write_options` go to the writer, e.g. bake=True). An option
    the reader or writer does not declare is refused before anything is written. `manifest`: record the output's
    sha256, the inputs' and the plan (as merge does; batch jobs use it to skip work already done). Returns a
    report."""
    from loraport.checkpoint import Checkpoint
    from loraport.formats import build_options, export_targets, get_format, load_adapter
    from loraport.outputs import check_output, staged_output

    t0 = time.perf_counter()
    if to in export_targets():
        if read_options or write_options:
            raise BadInputError(f"reader / writer options do not apply to --to {to} (an ONNX export)")
        return onnx_convert(adapters=[str(src)], to=to, out=str(out), base=None if base is None else str(base),
                            format=format, overwrite=overwrite)
    fmt = get_format(to)
    if not fmt.writable:
        raise BadInputError(f"the {to} format can be read but not written")
    wopts = build_options(fmt.write_options, write_options or {}, to, "write")
    if format:
        build_options(get_format(format).read_options, read_options, format, "read")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise BadInputError(f"--rank must be a positive integer, got {rank!r}")
    if rank is not None and not lossy:
        raise BadInputError("--rank re-factors the adapter, which changes it: pass --lossy as well")
    outp = check_output(out, [src, base], overwrite)
    ckpt = Checkpoint.open(base) if base is not None else None
    try:
        adapter = load_adapter(src, format=format, base=ckpt, **read_options)
        _check_naming(adapter, to, ckpt)
        adapter = drop_identity_replacements(adapter, ckpt)
        report: dict = {"source": str(src), "source_format": adapter.format, "to": to, "out": str(outp),
                        "base": None if base is None else str(base), "lossy": False, "refactored": []}
        dev = torch.device(device)
        if lossy and rank is not None:
            adapter, ref = refactor(adapter, ckpt, rank, dev, only_inexpressible=False)
            report.update(lossy=True, refactored=ref)
        is_dir = fmt.writes_folder(outp)
        stamp = _stamper(src, to, base, hash_cache) if manifest else None
        try:
            written = _write(fmt, adapter, outp, is_dir, overwrite, ckpt, staged_output, wopts, stamp)
        except BadInputError as e:
            if not (isinstance(e, Inexpressible) or (e.flag_hint or ("",))[0] == "--lossy") or not lossy:
                raise
            adapter, ref = refactor(adapter, ckpt, rank, dev, only_inexpressible=True)
            report.update(lossy=True, refactored=report["refactored"] + ref)
            written = _write(fmt, adapter, outp, is_dir, overwrite, ckpt, staged_output, wopts, stamp)
        report["files"] = [str(w) for w in written]
        report["deltas"] = len(adapter.deltas)
        report["notes"] = list(dict.fromkeys(adapter.notes))
        errs = [r["rel_error"] for r in report["refactored"]]
        report["max_rel_error"] = max(errs) if errs else 0.0
        back = load_adapter(outp, format=to, base=ckpt)
        report["max_abs_diff"] = compare(adapter, back, ckpt)
    finally:
        if ckpt is not None:
            ckpt.close()
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _write(fmt, adapter: Adapter, outp: Path, is_dir: bool, overwrite: bool, ckpt, staged_output,
           opts, stamp=None) -> list[Path]:
    with staged_output(outp, is_dir=is_dir, overwrite=overwrite) as stage:
        written = fmt.write_with(adapter, stage, ckpt, opts) or []
        if stamp is not None and is_dir:
            stamp(stage, None)  # inside the stage: renamed into place with the rest
    if stamp is not None and not is_dir:
        stamp(outp, outp.name)  # a sibling <out>.manifest.json
    return [outp / Path(w).name if is_dir else outp for w in written]


def _stamper(src, to: str, base, hash_cache):
    """Writes the integrity manifest of a converted adapter (see loraport/manifest.py)."""
    from loraport import manifest as mf

    def stamp(written: Path, name: str | None) -> None:
        inputs = mf.input_hashes([src, base], mf.HashCache.of(hash_cache))
        plan = {"to": to, "source": str(identity(src)),
                "base": None if base is None else str(identity(base))}
        m = mf.build(written, inputs=inputs, plan=plan, name=name)
        if name:
            mf.write_sibling(written, m)
        else:
            mf.write_into(written, m)

    return stamp


def _check_naming(adapter: Adapter, to: str, ckpt) -> None:
    """GGUF / torchtune targets read without a base keep their own naming; they only make sense in the same
    format."""
    from loraport.formats import formats

    if ckpt is not None or to == adapter.format:
        return
    own = tuple(p for f in formats().values() for p in f.own_naming)
    foreign = [d.target for d in adapter.deltas if d.target.startswith(own)]
    if foreign:
        raise BadInputError(
            f"{adapter.path}: targets are in {adapter.format} naming (e.g. {foreign[0]}); converting to {to} needs "
            "--base HF_MODEL to map them to HF names (and undo the q/k row permutation)")


def drop_identity_replacements(adapter: Adapter, ckpt) -> Adapter:
    """PEFT saves the untouched base layer of adapted embeddings (`save_embedding_layers`); as a replacement
    equal to the base it changes nothing, and formats that store only LoRA factors have no place for it."""
    if ckpt is None:
        return adapter
    keep, dropped = [], 0
    for d in adapter.deltas:
        if d.replaces_base and d.sets_values and d.target in ckpt and d.rows is None:  # not a widening
            w = ckpt.get(d.target)
            if tuple(w.shape) == tuple(d.value.shape) and torch.equal(w, d.value.to(w.dtype)):
                dropped += 1
                continue
        keep.append(d)
    if not dropped:
        return adapter
    return replace(adapter, deltas=keep,
                   notes=adapter.notes + [f"{dropped} saved base layer(s) identical to the base dropped"])


# --- lossy re-factorization ----------------------------------------------------------------------------
def _plain(d: Delta) -> bool:
    return d.plain_lora and d.rows is None


def dense_delta(d: Delta, ckpt, device: torch.device) -> torch.Tensor:
    """The exact fp32 ΔW a delta adds to its target (its row slice), in the target's orientation."""
    W = None
    if ckpt is not None:
        names = ckpt.resolve(d.target) or ckpt.resolve("model." + d.target)
        if names:
            W = ckpt.get(names[0]).to(device=device, dtype=torch.float32)
            d = d.resolve(tuple(W.shape), ckpt.layer_hint(names[0]))
            if d.rows is not None:
                W = W[d.rows[0]: d.rows[1]]
    if W is None and d.depends_on_base:
        raise BadInputError(f"{d.target}: a {d.label} update depends on the base weight; pass --base to re-factor it")
    D = d.dense(device, W)
    if D is None:
        raise BadInputError(f"{d.target}: pass --base so the shape of this {d.kind} update is known")
    return D


def refactor(adapter: Adapter, ckpt, rank: int | None, device: torch.device,
             only_inexpressible: bool) -> tuple[Adapter, list[dict]]:
    """Re-factor deltas to plain LoRA (scale 1) by truncated SVD: the non-plain ones (DoRA, Tucker, LoHa,
    full ...) when `only_inexpressible`, else every delta whose rank exceeds `rank`. Plain LoRA factors are
    decomposed through their thin QR factors (never forming ΔW); the rest from their dense ΔW."""
    from loraport.decompose import lowrank_svd, svd_full

    out, report = [], []
    for d in adapter.deltas:
        plain = _plain(d)
        if only_inexpressible and plain:
            out.append(d)
            continue
        if d.stacked:
            out.append(d)  # stacked expert factors are already low rank per expert
            continue
        k_orig = d.rank() or 0
        k = rank or k_orig or 8
        if plain and k_orig <= k:
            out.append(d)
            continue
        if plain:
            f = d.with_default_orientation().low_rank_factors()
            t = f.transpose
            B = f.B.to(device, torch.float32) * f.scale
            A = f.A.to(device, torch.float32)
            svd = lowrank_svd(B, A)
            Bk, Ak = svd.factors(k)
            err = svd.tail_error(k)
            nd = replace(d, A=Ak.cpu().contiguous(), B=Bk.cpu().contiguous(), scale=1.0, transpose=t,
                         alpha=float(k), scale_rule="refactored")
        else:
            D = dense_delta(d, ckpt, device)
            if D.dim() < 2:
                raise BadInputError(f"{d.target}: a 1-D update (bias / norm) has no LoRA form, not even a lossy one; "
                                    "convert to a format that stores it (peft)")
            M = D.reshape(D.shape[0], -1)
            svd = svd_full(M)
            Bk, Ak = svd.factors(k)
            err = svd.tail_error(k)
            if D.dim() > 2:  # conv kernel: A carries the kernel, B is 1x1
                Ak = Ak.reshape(Ak.shape[0], *D.shape[1:])
                Bk = Bk.reshape(*Bk.shape, 1, 1)
            layer = d.layer_kind
            nd = LoraDelta(d.target, A=Ak.cpu().contiguous(), B=Bk.cpu().contiguous(), scale=1.0, transpose=False,
                           rows=d.rows, alpha=float(k), scale_rule="refactored",
                           layer="linear" if layer in (None, "embedding", "conv1d") and D.dim() == 2 else layer,
                           source_key=d.source_key)
            if layer in ("embedding", "conv1d"):  # keep the layer's usual orientation: ΔW = (B'A')ᵀ
                nd = replace(nd, A=nd.B.t().contiguous(), B=nd.A.t().contiguous(), transpose=True, layer=layer)
        out.append(nd)
        report.append({"target": d.target, "from": d.label, "rank": int(min(k, svd.rank())),
                       "rel_error": float(err)})
    notes = adapter.notes + [f"lossy: {len(report)} update(s) re-factored by SVD"] if report else adapter.notes
    return replace(adapter, deltas=out, notes=notes), report


# --- read-back check ---------------------------------------------------------------------------------
def compare(a: Adapter, b: Adapter, ckpt=None, device: str = "cpu") -> float | None:
    """max |ΔW_a − ΔW_b| over all targets (None when the two do not name the same targets)."""
    dev = torch.device(device)
    ka = _by_target(a)
    kb = _by_target(b)
    if set(ka) != set(kb):
        return _compare_tensors(a, b, ckpt, dev)
    worst = 0.0
    for t, da in ka.items():
        try:
            x = dense_delta(da, ckpt, dev)
            y = dense_delta(kb[t], ckpt, dev)
        except BadInputError:
            return None
        if x.shape != y.shape:
            if x.numel() != y.numel():
                return math.inf
            y = y.reshape(x.shape)
        worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    return worst


def _compare_tensors(a: Adapter, b: Adapter, ckpt, dev: torch.device) -> float | None:
    """max |ΔW_a − ΔW_b| per target tensor, row slices summed in place: for a write that regroups them (a LoRA on
    q, k, v written as one on the fused qkv); None when the two update different tensors."""
    try:
        ta, tb = _tensor_sums(a, ckpt, dev), _tensor_sums(b, ckpt, dev)
    except BadInputError:
        return None
    if set(ta) != set(tb) or any(ta[t].shape[1:] != tb[t].shape[1:] for t in ta):
        return None
    worst = 0.0
    for t, x in ta.items():  # a slice nobody updates is zero: pad the shorter sum
        y = tb[t]
        n = max(x.shape[0], y.shape[0])
        x, y = (torch.cat([v, v.new_zeros(n - v.shape[0], *v.shape[1:])]) for v in (x, y))
        worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    return worst


def _tensor_sums(a: Adapter, ckpt, dev: torch.device) -> dict[str, torch.Tensor]:
    parts: dict[str, list] = {}
    for d in a.deltas:
        parts.setdefault(d.target, []).append((d.rows, dense_delta(d, ckpt, dev)))
    out = {}
    for t, ps in parts.items():
        rows = max(r[1] if r else D.shape[0] for r, D in ps)
        full = torch.zeros(rows, *ps[0][1].shape[1:], device=dev)
        for r, D in ps:
            full[slice(*r) if r else slice(None)] += D.reshape(full[slice(*r) if r else slice(None)].shape)
        out[t] = full
    return out


def _by_target(a: Adapter) -> dict:
    return {(d.target if d.rows is None else f"{d.target}[{d.rows[0]}:{d.rows[1]}]"): d for d in a.deltas}


# --- ONNX targets (implemented in loraport/onnx) --------------------------------------------------------
def onnx_convert(**kwargs) -> dict:
    try:
        from loraport.onnx import cli_convert
    except (ImportError, AttributeError):
        raise BadInputError("ONNX export is not available in this installation") from None
    return cli_convert(**kwargs)
