"""Benchmark: `loraport extract` with the randomized SVD vs the same extraction with a full torch.linalg.svd
per layer (what kohya's extract_lora_from_models.py and most scripts do), on the same synthetic layers.

A Llama-shaped fp16 base (q/k/v/o, gate/up/down per block) and a "fine-tuned" copy whose every matrix moved
by a decaying-spectrum update (a rank-`--signal` part with σᵢ ∝ 0.9ⁱ plus small dense noise, as fine-tuning
deltas look) are written to a temp folder. Each variant then runs `loraport.lowrank.extract` in its own
subprocess (fresh process, own peak RSS), streaming tensor pairs from the two checkpoints and writing a PEFT
adapter. Printed side by side: wall time, speed-up, peak RSS, and the per-layer relative error
‖ΔW − BA‖/‖ΔW‖ (mean / max) with the randomized method's excess over the optimum (the full SVD's error).

    python bench/extract_bench.py                     # hidden 1024, intermediate 2816, 2 blocks, rank 32
    python bench/extract_bench.py --hidden 2048 --inter 5632 --layers 2 --rank 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(folder: Path, hidden: int, inter: int, layers: int, signal: int, seed: int) -> int:
    import torch

    from loraport.safetensors_io import save_file

    g = torch.Generator().manual_seed(seed)
    kv = hidden // 4  # grouped-query attention: 4 query heads per kv head
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    base, tuned = {}, {}
    for i in range(layers):
        for mod, (o, n) in shapes.items():
            name = f"model.layers.{i}.{mod}.weight"
            W = torch.randn(o, n, generator=g) * 0.02
            U = torch.linalg.qr(torch.randn(o, signal, generator=g)).Q
            V = torch.linalg.qr(torch.randn(n, signal, generator=g)).Q
            s = 0.05 * 0.9 ** torch.arange(signal, dtype=torch.float32)
            D = (U * s) @ V.T + 2e-5 * torch.randn(o, n, generator=g)
            base[name] = W.half()
            tuned[name] = (W + D).half()
    for which, t in (("base", base), ("tuned", tuned)):
        (folder / which).mkdir()
        save_file(t, folder / which / "model.safetensors", {"format": "pt"})
        (folder / which / "config.json").write_text('{"model_type": "llama"}')
    return len(base)


def run_one(folder: Path, svd: str, rank: int, device: str) -> dict:
    import torch

    from loraport.lowrank import extract

    x = torch.randn(300, 200)  # warm LAPACK up outside the timed region (first calls pay one-off set-up)
    torch.linalg.svd(x, full_matrices=False), torch.linalg.qr(x)
    t0 = time.perf_counter()
    rep = extract(folder / "base", folder / "tuned", folder / f"out-{svd}", rank=rank, method=svd, device=device,
                  overwrite=True)
    wall = time.perf_counter() - t0
    errs = {x["target"]: x["rel_error"] for x in rep["layers"]}
    svd_s = sum(x["seconds"] for x in rep["layers"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"svd": svd, "wall_s": wall, "layer_s": svd_s, "peak_rss": rss, "errors": errs,
            "methods": sorted({x["method"] for x in rep["layers"]})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--signal", type=int, default=128, help="rank of the structured part of each ΔW")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_child", nargs=2, metavar=("FOLDER", "SVD"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(run_one(Path(a._child[0]), a._child[1], a.rank, a.device)))
        return

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="loraport-extract-bench-"))
    try:
        n = build(tmp, a.hidden, a.inter, a.layers, a.signal, a.seed)
        size = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
        print(f"{n} matrices (hidden {a.hidden}, intermediate {a.inter}, {a.layers} blocks), fp16 base + tuned "
              f"{size / 1e6:.0f} MB, rank {a.rank}, device {a.device}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPU(s)")
        res = {}
        for svd in ("full", "randomized"):
            p = subprocess.run([sys.executable, __file__, "--_child", str(tmp), svd, "--rank", str(a.rank),
                                "--device", a.device], capture_output=True, text=True, check=False)
            if p.returncode != 0:
                sys.exit(f"{svd} run failed:\n{p.stderr[-2000:]}")
            res[svd] = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    full, rnd = res["full"], res["randomized"]
    excess = [rnd["errors"][k] / full["errors"][k] - 1 for k in full["errors"] if full["errors"][k] > 0]
    rows = [("variant", "wall s", "SVD+err s", "speed-up", "peak RSS", "mean rel err", "max rel err")]
    for name, r in (("full torch.linalg.svd", full), ("randomized (loraport)", rnd)):
        e = list(r["errors"].values())
        rows.append((name, f"{r['wall_s']:.2f}", f"{r['layer_s']:.2f}", f"{full['wall_s'] / r['wall_s']:.1f}x",
                     f"{r['peak_rss'] / 2**20:.0f} MiB", f"{sum(e) / len(e):.4e}", f"{max(e):.4e}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"randomized error over the optimum (full SVD) per layer: mean {sum(excess) / len(excess):+.3%}, "
          f"max {max(excess):+.3%}; methods used: {rnd['methods']}")


if __name__ == "__main__":
    main()
