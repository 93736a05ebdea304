"""The per-layer quantization report as a table for people (the same rows `merge --json` prints)."""

from __future__ import annotations


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def format_table(rows: list[dict], limit: int | None = 40) -> str:
    """Fixed-width text: one line per quantized tensor (the first `limit`), then the total and any warning."""
    body = [r for r in rows if r.get("name") != "(total)"]
    total = next((r for r in rows if r.get("name") == "(total)"), None)
    head = f"{'tensor':56s} {'rel.err':>8s} {'SNR dB':>7s} {'kept':>6s} {'changed':>8s} {'bytes':>19s}"
    lines = [head]
    for r in body[:limit] if limit else body:
        name = r["name"] if len(r["name"]) <= 56 else "…" + r["name"][-55:]
        err = "" if r.get("rel_error") is None else f"{r['rel_error']:.4f}"
        snr = "" if r.get("snr_db") is None else f"{r['snr_db']:.1f}"
        flag = " erased" if r.get("erased") else ""
        lines.append(f"{name:56s} {err:>8s} {snr:>7s} {_pct(r.get('delta_retained')):>6s} "
                     f"{_pct(r.get('codes_changed')):>8s} {r['bytes_before']:>9d}→{r['bytes_after']:<9d}{flag}")
    if limit and len(body) > limit:
        lines.append(f"… {len(body) - limit} more (all rows with --json)")
    if total:
        lines.append(f"total: {total['tensors']} tensors, {total['bytes_before']} → {total['bytes_after']} bytes, "
                     f"mean rel.err {total.get('rel_error_mean', 0):.4f}"
                     + (f", median delta kept {_pct(total['delta_retained_median'])}"
                        if total.get("delta_retained_median") is not None else ""))
        if total.get("warning"):
            lines.append(f"warning: {total['warning']}")
    return "\n".join(lines)
