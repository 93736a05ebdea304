"""Benchmark: `loraport merge` vs PEFT (load + merge_and_unload + save_pretrained) vs a plain copy of the base
files, side by side in one run, with the peak memory of each.

For each `--size`, a synthetic fp16 Llama-shaped model (sharded, with an index) and all-linear PEFT LoRA
adapters (r=16; r=64 for 8b) are generated from local random data in a temp folder. Every row runs in its
own child process; before each row the base and adapter files are read once, so every row starts with its
inputs in the page cache (warm cache, equal for all), and the previous row's output is deleted and synced.

Rows:  copy          shutil.copyfile of every base file + fsync (what reading and writing the bytes costs)
       loraport      `loraport merge` with one adapter (default flags: manifest on; --no-manifest row too), as
                     the first merge against this base: an empty input-hash cache, so every input is hashed
       loraport cached  the same merge again with the cache an earlier merge left (the base's sha256 is reused
                     for the unchanged files: what every merge after the first into the same base costs)
       loraport x8   eight adapters at once (weights 1/8 each)
       loraport nf4  `--quantize nf4` (bitsandbytes NF4 layout, loraport.quant)
       peft          transformers LlamaForCausalLM.from_pretrained(fp16) + PeftModel.from_pretrained +
                     merge_and_unload() + save_pretrained() + fsync of its files (every row's output is made
                     durable, as loraport's is); capped with RLIMIT_AS (--peft-mem-limit) so a model larger
                     than memory fails with MemoryError instead of swapping the machine to death
Columns: wall (s), net = wall minus the child's start-up (the same child stopped right after its imports:
interpreter, torch/loraport or torch/transformers/peft imports, tear-down), cpu s net (user+system CPU seconds
of the child minus those of its start-up: robust when other work shares the cores), peak anon RSS (RssAnon
sampled every 10 ms: private memory, page cache excluded), peak RSS (VmHWM: file pages mapped by the process
included), and ratios.

    python bench/merge_bench.py                       # 400m (~440 MB)
    python bench/merge_bench.py --size 400m --size 4g # two sizes: peak RSS independent of model size
    python bench/merge_bench.py --size 8b --rows copy,loraport,peft   # ~16 GB, r=64: bigger than RAM-bound
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PY, ROOT, SIZES, build_adapter, build_base, drop_written, gib, run_child, table, warm  # noqa: E402

ALL_ROWS = ("copy", "loraport", "loraport-cached", "loraport-nomanifest", "loraport-x8", "loraport-nf4", "peft",
            "loraport-cuda", "loraport-x8-cuda")
DEFAULT_ROWS = ALL_ROWS[:7]


# ------------------------------------------------------------------------------------------------ children
# Start-up = the wall time of the same child when it stops right after its imports (BENCH_IMPORTS_ONLY=1):
# interpreter start, imports (torch alone is ~3 s here) and interpreter tear-down. net = wall - start-up.
def _ready() -> None:
    import os

    if os.environ.get("BENCH_IMPORTS_ONLY"):
        sys.exit(0)


def child_loraport(*argv: str) -> None:
    import loraport.formats  # noqa: F401 - format discovery, as the merge command does on first use
    import loraport.manifest  # noqa: F401
    import loraport.merging  # noqa: F401
    from loraport.cli import main

    loraport.formats.formats()  # imports every format module, as the first adapter detection does
    _ready()
    main(list(argv), prog_name="loraport")


def child_copy(src: str, dst: str) -> None:
    _ready()
    s, d = Path(src), Path(dst)
    d.mkdir()
    for f in sorted(s.iterdir()):
        shutil.copyfile(f, d / f.name)
    _fsync_tree(d)


def child_peft(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _ready()
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float16)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size="2GB")
    _fsync_tree(Path(out))  # the same durability as the other rows (loraport and copy fsync what they write)


def _fsync_tree(root: Path) -> None:
    import os

    for f in sorted(x for x in root.rglob("*") if x.is_file()):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------ driver
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class GpuSampler:
    """GPU utilisation while a row runs: `nvidia-smi -lms 100` in the background (else no figure)."""

    def __init__(self, enabled: bool):
        self.enabled, self.p, self.vals = enabled, None, []

    def __enter__(self):
        if self.enabled and shutil.which("nvidia-smi"):
            import subprocess

            self.p = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                       "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.terminate()
            out, _ = self.p.communicate()
            self.vals = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]
        return False

    def summary(self) -> dict | None:
        if not self.enabled:
            return None
        if not self.vals:
            return {"how": "nvidia-smi unavailable"}
        return {"mean": round(sum(self.vals) / len(self.vals), 1), "max": max(self.vals), "samples": len(self.vals),
                "how": "nvidia-smi every 100 ms"}


def _argv_loraport(base: Path, adapters: list[Path], out: Path, extra: list[str], device: str = "cpu") -> list[str]:
    argv = [PY, __file__, "--child", "loraport", "merge", "--base", str(base), "--out", str(out), "--device", device,
            "--json"]
    for a in adapters:
        argv += ["--adapter", str(a)]
        if len(adapters) > 1:
            argv += ["--weight", str(1 / len(adapters))]
    return argv + extra


def _max_diff(a: Path, b: Path, names: list[str]) -> float:
    """max |loraport − PEFT| over a few merged tensors (a sanity check that both did the same merge)."""
    from loraport.checkpoint import Checkpoint

    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    d = 0.0
    for n in names:
        d = max(d, float((ca.get(n).float() - cb.get(n).float()).abs().max()))
    ca.close()
    cb.close()
    return d


def _primed_cache(cache: Path, inputs: list[Path], argv: list[str], out: Path) -> Path:
    """An input-hash cache as one earlier merge against these inputs leaves it. A digest is only remembered for
    files whose ctime is RACY_SECONDS old (loraport.manifest), so wait for that first (the bench just wrote them)."""
    from loraport.manifest import RACY_SECONDS

    newest = max(f.stat().st_ctime for p in inputs for f in [p, *p.rglob("*")])
    time.sleep(max(0.0, newest + RACY_SECONDS + 0.5 - time.time()))
    r = run_child("prime", argv, env={"LORAPORT_CACHE_DIR": str(cache)})
    if r.rc != 0:
        raise SystemExit(f"priming the hash cache failed: {r.err.strip()[-300:]}")
    drop_written(out)
    warm(inputs)
    return cache


def bench_size(size: str, tmp: Path, rows: list[str], peft_limit: int, repeat: int = 1) -> list[dict]:
    rank = 64 if size == "8b" else 16
    base, ad = tmp / f"base-{size}", tmp / f"adapter-{size}"
    t0 = time.perf_counter()
    nbytes = build_base(base, size)
    abytes = build_adapter(ad, size, rank)
    extra_ads = []
    if "loraport-x8" in rows or "loraport-x8-cuda" in rows:
        for i in range(1, 8):
            extra_ads.append(tmp / f"adapter-{size}-{i}")
            build_adapter(extra_ads[-1], size, rank, seed=100 + i)
    print(f"[{size}] built base {gib(nbytes)} ({len(list(base.glob('*.safetensors')))} shards), adapter r={rank} "
          f"{gib(abytes)} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    res = []
    merged_lp = tmp / f"out-{size}-loraport"
    for row in rows:
        out = tmp / f"out-{size}-{row}"
        ads = [ad, *extra_ads] if row.startswith("loraport-x8") else [ad]
        cuda = row.endswith("-cuda")
        if cuda and not _has_cuda():
            res.append({"size": size, "row": row, "na": "n/a (no CUDA here)"})
            continue
        warm([base, *ads])
        cache = None  # every loraport row but "cached" starts from an empty input-hash cache
        if row == "copy":
            argv = [PY, __file__, "--child", "copy", str(base), str(out)]
        elif row == "peft":
            argv = [PY, __file__, "--child", "peft", str(base), str(ad), str(out)]
        else:
            extra = {"loraport-nomanifest": ["--no-manifest"], "loraport-nf4": ["--quantize", "nf4"]}.get(row, [])
            if row == "loraport-nf4":
                try:
                    from loraport.quant import get_quantizer

                    get_quantizer("nf4")
                except Exception as e:  # noqa: BLE001 - the quantizer is optional here: report n/a
                    res.append({"size": size, "row": row, "na": f"n/a ({e})"})
                    continue
            argv = _argv_loraport(base, ads, out, extra, "cuda" if cuda else "cpu")
            if row == "loraport-cached":
                cache = _primed_cache(tmp / f"cache-{size}", [base, *ads], argv, out)
        print(f"[{size}] {row} ...", file=sys.stderr)
        runs = []
        for i in range(repeat):
            if i:
                drop_written(out)
                warm([base, *ads])
            env = None
            if row.startswith("loraport"):
                env = {"LORAPORT_CACHE_DIR": str(cache or tempfile.mkdtemp(prefix="cold-cache-", dir=tmp))}
            with GpuSampler(enabled=cuda) as gpu:
                runs.append(run_child(row, argv, mem_limit=peft_limit if row == "peft" else None, env=env))
            runs[-1].gpu = gpu.summary()
            if runs[-1].rc != 0:
                break
        r = min(runs, key=lambda x: (x.rc != 0, x.wall))
        sts = [run_child("startup", argv, env={"BENCH_IMPORTS_ONLY": "1"}) for _ in range(repeat)]
        st = min(x.wall for x in sts)
        ent = {"size": size, "row": row, "rc": r.rc, "wall": r.wall, "startup": st, "net": r.wall - st,
               "cpu": r.cpu, "cpu_net": r.cpu - min(x.cpu for x in sts),
               "anon": max(x.anon for x in runs), "hwm": max(x.hwm for x in runs), "bytes": nbytes,
               "walls": [round(x.wall, 3) for x in runs]}
        if cuda:
            ent["gpu"] = r.gpu
        if r.rc != 0:
            last = (r.err.strip().splitlines() or ["?"])[-1]
            ent["failed"] = last[:160]
        res.append(ent)
        if row == "peft" and r.rc == 0 and merged_lp.exists():
            names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
            ent["max_abs_vs_loraport"] = _max_diff(merged_lp, out, names)
        if row != "loraport":
            drop_written(out)
    drop_written(merged_lp)
    shutil.rmtree(base)
    for a in [ad, *extra_ads]:
        shutil.rmtree(a)
    return res


def report(res: list[dict]) -> str:
    lines = []
    sizes = list(dict.fromkeys(r["size"] for r in res))
    for size in sizes:
        rs = {r["row"]: r for r in res if r["size"] == size}
        ok = lambda k, rs=rs: k in rs and "na" not in rs[k] and rs[k].get("rc") == 0  # noqa: E731
        rows = []
        for name, r in rs.items():
            if "na" in r:
                rows.append([name, r["na"], "", "", "", "", "", ""])
                continue
            gbps = r["bytes"] / max(r["net"], 1e-9) / 1e9
            status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}: {r.get('failed', '')}"
            rows.append([name, f"{r['wall']:.2f}", f"{r['net']:.2f}", f"{gbps:.2f}", f"{r['cpu_net']:.2f}",
                         gib(r["anon"]), gib(r["hwm"]), status])
        lines.append(f"\n== size {size}: {gib(next(iter(rs.values())).get('bytes', 0))} fp16 base, "
                     f"{SIZES[size][2]} layers ==")
        head = ["row", "wall s", "net s", "GB/s net", "cpu s net", "peak anon", "peak RSS", "status"]
        lines.append(table(rows, head))
        rat = []
        lp = rs.get("loraport")
        if ok("loraport"):
            if ok("peft"):
                p = rs["peft"]
                rat.append(["loraport / PEFT time (net)", f"{lp['net'] / p['net']:.3f}",
                            f"{p['net'] / lp['net']:.1f}x faster (target >= 3x)"])
                rat.append(["loraport / PEFT peak anon RSS", f"{lp['anon'] / p['anon']:.3f}", "(target <= 0.5)"])
                rat.append(["loraport / PEFT peak RSS (VmHWM)", f"{lp['hwm'] / p['hwm']:.3f}", "(target <= 0.40)"])
                rat.append(["loraport / PEFT wall", f"{lp['wall'] / p['wall']:.3f}", ""])
                if "max_abs_vs_loraport" in p:
                    rat.append(["max |loraport - PEFT| (2 tensors)", f"{p['max_abs_vs_loraport']:.3g}", ""])
            elif "peft" in rs:
                rat.append(["PEFT", "cannot run", rs["peft"].get("failed", rs["peft"].get("na", ""))[:100]])
            if ok("loraport-cached") and ok("peft"):
                c = rs["loraport-cached"]
                rat.append(["loraport cached / PEFT time (net)", f"{c['net'] / rs['peft']['net']:.3f}",
                            f"{rs['peft']['net'] / c['net']:.1f}x faster (target >= 3x)"])
            if ok("copy"):
                rat.append(["loraport / copy time (net)", f"{lp['net'] / rs['copy']['net']:.3f}", "(target <= 2)"])
            if ok("copy") and ok("loraport-cached"):
                rat.append(["loraport cached / copy time (net)",
                            f"{rs['loraport-cached']['net'] / rs['copy']['net']:.3f}", "(target <= 2)"])
            if ok("loraport-nomanifest") and ok("copy"):
                rat.append(["loraport --no-manifest / copy (net)",
                            f"{rs['loraport-nomanifest']['net'] / rs['copy']['net']:.3f}", "(target <= 2)"])
            if ok("loraport-x8"):
                rat.append(["8 adapters / 1 adapter (net)", f"{rs['loraport-x8']['net'] / lp['net']:.3f}",
                            "(target < 1.5)"])
                rat.append(["8 adapters / 1 adapter (cpu net)",
                            f"{rs['loraport-x8']['cpu_net'] / max(lp['cpu_net'], 1e-9):.3f}", ""])
            for c, one in (("loraport-cuda", "loraport"), ("loraport-x8-cuda", "loraport-x8")):
                if ok(c):
                    g = rs[c].get("gpu") or {}
                    rat.append([f"{c} / cpu (net)", f"{rs[c]['net'] / rs[one]['net']:.3f}" if ok(one) else "-",
                                f"{rs[c]['bytes'] / rs[c]['net'] / 1e9:.2f} GB/s; GPU util mean {g.get('mean', '?')}% "
                                f"max {g.get('max', '?')}% ({g.get('how', 'no sampler')})"])
            if ok("loraport-nf4"):
                rat.append(["nf4 / fp16 merge (wall)", f"{rs['loraport-nf4']['wall'] / lp['wall']:.3f}",
                            "(target < 1.5)"])
        if rat:
            lines.append("")
            lines.append(table(rat, ["ratio", "value", ""]))
    if len(sizes) > 1:
        lp = [r for r in res if r["row"] == "loraport" and r.get("rc") == 0]
        if len(lp) > 1:
            lines.append("\nloraport peak anon RSS by size: " + ", ".join(f"{r['size']}: {gib(r['anon'])}" for r in lp))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", action="append", choices=[s for s in SIZES if s != "tiny"] + ["tiny"],
                    help="model size (repeatable; default 400m)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated subset of {', '.join(ALL_ROWS)} (default: all but the CUDA rows)")
    ap.add_argument("--tmp", default=None, help="where to build the models (default: a temp dir)")
    ap.add_argument("--peft-mem-limit", default="20GB", help="RLIMIT_AS for the PEFT child")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported (a shared, "
                    "noisy machine) and the largest peak memory")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        {"copy": child_copy, "peft": child_peft, "loraport": child_loraport}[sys.argv[2]](*sys.argv[3:])
        return
    a = ap.parse_args()
    from loraport.console import parse_size

    rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        ap.error(f"unknown rows {bad}")
    if "peft" in rows and "loraport" in rows:  # loraport first so PEFT's output can be compared with it
        rows = [r for r in rows if r != "peft"] + ["peft"]
    tmp_parent = Path(a.tmp) if a.tmp else None
    res = []
    with tempfile.TemporaryDirectory(prefix="loraport-bench-", dir=tmp_parent) as d:
        for size in a.size or ["400m"]:
            res += bench_size(size, Path(d), rows, parse_size(a.peft_mem_limit), a.repeat)
    import os
    import platform

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} RAM, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; warm page cache for inputs, outputs fsynced")
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    _ = ROOT
    main()
