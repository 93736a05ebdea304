"""What an adapter's updates look like as matrices: per-layer singular-value spectra, effective rank and, given
the base, the size of each update relative to the weight it changes. Used by `loraport inspect --plot`.

`spectrum_report(adapter, base=None) -> dict` computes the numbers (the exact spectrum of scale·B·A from the
thin factors, no dense ΔW); `plot_spectrum(report, path)` draws them into a PNG with matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from loraport import decompose as dc
from loraport.adapter import Adapter

MAX_SV = 256  # singular values kept per layer in the report (a LoRA has r of them; dense diffs are capped)


def spectrum_report(adapter: Adapter, base=None, device: torch.device | str = "cpu") -> dict:
    """Per layer: kind, stored rank, singular values of the update (scale·B·A; a dense diff's own), their
    Frobenius norm, effective rank exp(H(σ/Σσ)), the ranks keeping 90% / 99% of Σσ², and with `base` (a
    Checkpoint) ‖ΔW‖_F / ‖W‖_F of the tensor it updates. DoRA layers are measured on their direction
    update scale·B·A (the magnitude rescaling is not a low-rank term)."""
    from loraport.lowrank import thin_factors

    layers, skipped = [], []
    for d in adapter.deltas:
        if d.has_lora_factors:
            svd = dc.lowrank_svd(*thin_factors(d, device))
            kind = d.variant
            rank = d.rank()
        elif d.stores_dense and len(d.implied_shape()) >= 2:
            svd = dc.svd_full(dc.as_matrix(d.dense(device)))
            kind, rank = "full", None
        else:
            skipped.append({"target": d.target, "kind": d.kind})
            continue
        S = svd.S.double().cpu()
        norm = math.sqrt(float(S.pow(2).sum()))
        row = {
            "target": d.target,
            "rows": list(d.rows) if d.rows else None,
            "kind": kind,
            "rank": rank,
            "singular_values": [float(x) for x in S[:MAX_SV]],
            "norm": norm,
            "effective_rank": dc.effective_rank(S),
            "rank_90": dc.rank_for_energy(S, 0.90),
            "rank_99": dc.rank_for_energy(S, 0.99),
        }
        if base is not None:
            row["rel_to_base"] = _relative_to_base(base, d, norm)
        layers.append(row)
    eff = [x["effective_rank"] for x in layers]
    rep = {
        "adapter": adapter.path or adapter.name,
        "format": adapter.format,
        "layers": layers,
        "skipped": skipped,
        "num_layers": len(layers),
        "mean_effective_rank": sum(eff) / len(eff) if eff else 0.0,
        "max_rank": max((x["rank"] or 0 for x in layers), default=0),
    }
    rel = [x["rel_to_base"] for x in layers if x.get("rel_to_base") is not None]
    if base is not None:
        rep["max_rel_to_base"] = max(rel, default=None)
        rep["mean_rel_to_base"] = sum(rel) / len(rel) if rel else None
    return rep


def _relative_to_base(base, d, norm: float) -> float | None:
    names = base.resolve(d.target) if hasattr(base, "resolve") else ([d.target] if d.target in base else [])
    if not names:
        return None
    W = base.get(names[0])
    if d.rows is not None:
        W = W[d.rows[0]: d.rows[1]]
    wn = float(torch.linalg.vector_norm(W.float()))
    return norm / wn if wn > 0 else None


# --- plotting --------------------------------------------------------------------------------------
def short_name(target: str) -> str:
    """'model.layers.12.self_attn.q_proj.weight' → '12.q_proj'; names without a block number keep their
    last two parts."""
    t = re.sub(r"\.weight$", "", target)
    parts = t.split(".")
    nums = [p for p in parts if p.isdigit()]
    if nums:
        return f"{'.'.join(nums)}.{parts[-1]}"
    return ".".join(parts[-2:])


def plot_spectrum(report: dict, path: str | Path) -> Path:
    """Draw `report` (from `spectrum_report`) into a PNG at `path`: normalized singular-value spectra per
    layer (colour = layer order), effective rank vs stored rank per layer, and ‖ΔW‖/‖W‖ per layer when the
    report has it."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib.colors import Normalize

    layers = report["layers"]
    n = len(layers)
    has_base = any(x.get("rel_to_base") is not None for x in layers)
    rows = 3 if has_base else 2
    width = min(28.0, max(11.0, 0.22 * n + 3))
    fig, axes = plt.subplots(rows, 1, figsize=(width, 3.6 * rows + 0.6), constrained_layout=True)
    title = f"{Path(str(report.get('adapter') or 'adapter')).name} — {n} layer(s), format {report.get('format')}"
    fig.suptitle(title, fontsize=13)
    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(vmin=0, vmax=max(n - 1, 1))

    ax = axes[0]
    for i, x in enumerate(layers):
        s = x["singular_values"]
        if not s or s[0] <= 0:
            continue
        ys = [max(v / s[0], 1e-12) for v in s]
        ax.plot(range(1, len(ys) + 1), ys, color=cmap(norm(i)), lw=1.2, alpha=0.8,
                marker="." if len(ys) <= 64 else None)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σᵢ / σ₁")
    ax.set_title("singular-value spectrum of each layer's update (normalized)")
    ax.grid(True, which="both", alpha=0.3)
    if n > 1:
        cb = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
        cb.set_label("layer (file order)")

    labels = [short_name(x["target"]) for x in layers]
    xs = list(range(n))
    step = max(1, math.ceil(n / 120))
    ax = axes[1]
    ax.bar(xs, [x["effective_rank"] for x in layers], color=[cmap(norm(i)) for i in xs], label="effective rank")
    ranks = [x["rank"] for x in layers]
    if any(r is not None for r in ranks):
        ax.scatter([i for i, r in zip(xs, ranks) if r is not None], [r for r in ranks if r is not None],
                   marker="_", s=120, color="crimson", label="stored rank", zorder=3)
    ax.scatter(xs, [x["rank_90"] for x in layers], marker="x", s=18, color="black", label="rank for 90% energy",
               zorder=3)
    ax.set_ylabel("rank")
    ax.set_title(f"effective rank per layer (mean {report.get('mean_effective_rank', 0):.2f})")
    top = max([x["effective_rank"] for x in layers] + [r or 0 for r in ranks] + [1])
    ax.set_ylim(0, top * 1.3)
    ax.legend(loc="upper center", ncol=3, fontsize=8, framealpha=0.9)
    _xticks(ax, xs, labels, step)

    if has_base:
        ax = axes[2]
        vals = [x.get("rel_to_base") or 0.0 for x in layers]
        ax.bar(xs, vals, color=[cmap(norm(i)) for i in xs])
        ax.set_ylabel("‖ΔW‖ / ‖W‖")
        if max(vals, default=0) > 0 and min(v for v in vals if v > 0) * 100 < max(vals):
            ax.set_yscale("log")
        ax.set_title("size of each update relative to its base weight (Frobenius)")
        _xticks(ax, xs, labels, step)

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:  # written beside, renamed into place: never a half-written PNG
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _xticks(ax, xs, labels, step):
    ax.set_xticks(xs[::step])
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=7 if len(xs) > 40 else 8)
    ax.set_xlim(-0.7, len(xs) - 0.3)
    ax.grid(True, axis="y", alpha=0.3)
