"""ONNX export benchmark: loraport's streaming export vs the plain route, and ORT latency merged vs multi-LoRA.

    python bench/onnx_bench.py                      # ~220M-parameter Llama shape, fp32 and bf16 bases, r=16 LoRA
    python bench/onnx_bench.py --repeat 3           # best of 3 (routes interleaved), spread printed
    python bench/onnx_bench.py --size 1b            # Llama-3.2-1B shape, bf16 base: how the ratios scale
    python bench/onnx_bench.py --size 8b --skip-plain   # Llama-8B-shaped synthetic model (fp16): ~35 GB of disk

Every row exports **fp32** ONNX (external data) from the same base, once per base dtype:
  fp32 base   the synthetic checkpoint stored fp32: transformers can map it without copying
  bf16 base   stored bf16, as real checkpoints ship: an fp32 export must upcast every weight

Rows, each a fresh process started the way a user would start it:
  plain     a child that loads the merged model (merged beforehand with `loraport merge`, in the base's dtype;
            that merge is not timed) with transformers `from_pretrained(dtype=torch.float32)`, runs
            `torch.onnx.export(dynamo=True)` and saves with external data
  loraport  `python -m loraport convert --to onnx --base B --adapter A --out O` (graph captured weights-free,
            merged weights streamed to model.onnx.data)
  multi     the same with --multi-lora (graph + .onnx_adapter)
  cached    the loraport row again with this architecture's graph already in loraport's graph cache (an untimed
            export primes it): what every export after the first of the same architecture and options costs
Every loraport row but "cached" runs with an empty cache folder (LORAPORT_CACHE_DIR), so it traces the graph.
Time is the wall clock from process start to exit (interpreter start and imports included, for every row).
Memory is sampled from this process every ~10 ms over the row's whole process tree (the child and any
process it starts, recursively): `RSS` is the peak of the tree's summed VmRSS (file-backed mapped pages
included: a mapped checkpoint counts), `anon` the peak of the summed RssAnon (private memory only).
Inputs are read once before each row so every row finds them in the page cache. Rows are interleaved over
--repeat rounds; the table shows the best time (min-max spread) and the highest memory seen.
The synthetic weights are random (std 0.02) and written tensor by tensor; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "220m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=16),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),  # Llama-3.2-1B shaped
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
}
DEFAULT_DTYPES = {"tiny": "fp32,bf16", "220m": "fp32,bf16", "1b": "bf16", "8b": "fp16"}
DEFAULT_EXPORT = {"tiny": "fp32", "220m": "fp32", "1b": "fp32", "8b": "fp16"}  # fp32 8B would be 32 GB of data
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLAIN, OURS, MULTI = "plain (transformers load + torch.onnx dynamo)", "loraport convert --to onnx", \
    "loraport convert --to onnx --multi-lora"
CACHED = "loraport convert --to onnx (graph cached)"


def shapes(size: str) -> dict[str, tuple[int, ...]]:
    cfg = SIZES[size]
    h, inter, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                    p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return out


def build_base(folder: Path, size: str, dtype: str) -> Path:
    """A Llama-shaped HF folder with random weights stored in `dtype` (same values for every dtype, rounded)."""
    import torch

    from loraport.safetensors_io import StreamingWriter

    if (folder / "model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tdt = getattr(torch, DTYPE_NAMES[dtype])
    g = torch.Generator().manual_seed(0)
    sh = shapes(size)
    w = StreamingWriter(tmp / "model.safetensors", [(n, tdt, s) for n, s in sh.items()], {"format": "pt"})
    for n, s in sh.items():
        w.write(n, (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(tdt))
    w.close()
    (tmp / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": DTYPE_NAMES[dtype], **SIZES[size]}))
    tmp.rename(folder)
    return folder


def build_adapter(folder: Path, size: str, rank: int = 16) -> Path:
    """An all-linear PEFT LoRA (fp32 A and B, both random), shared by every base dtype."""
    import torch

    from loraport.safetensors_io import save_file

    if (folder / "adapter_model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    lora = {}
    for n, s in shapes(size).items():
        if any(f".{m}." in n for m in TARGETS):
            mod = n[: -len(".weight")]
            lora[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rank, s[1], generator=g) * 0.02
            lora[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(s[0], rank, generator=g) * 0.02
    save_file(lora, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "task_type": "CAUSAL_LM", "base_model_name_or_path": None}))
    return folder


# ---------------------------------------------------------------------------------------------- plain route
def plain_child(merged: str, out: str) -> None:
    """What a user does without loraport: load the merged model in fp32, dynamo-export it, save."""
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    m.config.use_cache = False
    ids = torch.zeros(2, 8, dtype=torch.int64)
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    prog = torch.onnx.export(m, (), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                             dynamo=True, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                             dynamic_shapes=dyn)
    Path(out).mkdir()
    prog.save(str(Path(out) / "model.onnx"), external_data=True)


# ---------------------------------------------------------------------------------------------- measuring
def _tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _mem(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of a live process in bytes; zeros once it is gone."""
    from bench.common import proc_status

    rss, anon = proc_status(pid, "VmRSS", "RssAnon")
    return rss, anon


def measure(argv: list[str], out: Path, cache: Path | None = None) -> dict:
    """Run argv; wall time, peak summed VmRSS and RssAnon of its process tree (sampled every ~10 ms).
    `cache`: loraport's cache folder for the run (None: a fresh empty one, so the graph is captured)."""
    if out.exists():
        shutil.rmtree(out)
    fresh = None
    if cache is None:
        cache = fresh = Path(tempfile.mkdtemp(prefix="loraport-bench-cache-"))
    env = {**os.environ, "LORAPORT_CACHE_DIR": str(cache)}
    env.pop("LORAPORT_NO_GRAPH_CACHE", None)
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    peak = {"rss": 0, "anon": 0, "procs": 1}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _tree(p.pid)
            mems = [_mem(q) for q in pids]
            peak["rss"] = max(peak["rss"], sum(m[0] for m in mems))
            peak["anon"] = max(peak["anon"], sum(m[1] for m in mems))
            peak["procs"] = max(peak["procs"], len(pids))
            done.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = p.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {p.returncode}):\n{stderr[-3000:]}")
    return {"wall": wall, **peak}


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(16 << 20):
                    pass


def latencies(cases: dict[str, tuple[Path, Path | None]], seq: int, runs: int) -> dict[str, float]:
    """Median ORT CPU latency per case; the cases are run round-robin so machine load hits them alike."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    live = {}
    for name, (model, adapter) in cases.items():
        s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in s.get_inputs()}
        f = {"input_ids": np.zeros((1, seq), np.int64), "attention_mask": np.ones((1, seq), np.int64),
             "position_ids": np.arange(seq, dtype=np.int64)[None]}
        f = {k: v for k, v in f.items() if k in names}
        a = ro = None
        if adapter is not None:
            a = ort.LoraAdapter()
            a.Load(str(adapter))
            ro = ort.RunOptions()
            ro.add_active_adapter(a)
        live[name] = (s, f, ro, a)  # keep the adapter referenced while its RunOptions is used
        for _ in range(2):
            s.run(None, f, ro)
    ts: dict[str, list[float]] = {n: [] for n in cases}
    for _ in range(runs):
        for name, (s, f, ro, _a) in live.items():
            t = time.perf_counter()
            s.run(None, f, ro)
            ts[name].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in ts.items()}


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="220m")
    ap.add_argument("--base-dtype", default=None,
                    help="comma list of base checkpoint dtypes (fp32, bf16, fp16); default fp32,bf16 (8b: fp16)")
    ap.add_argument("--export-dtype", choices=["fp32", "fp16"], default=None,
                    help="ONNX weight dtype of the loraport rows (default fp32; 8b: fp16). The plain row is fp32")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every row (routes interleaved); best time kept")
    ap.add_argument("--work", default=None, help="folder for the synthetic models and outputs (default: a temp dir)")
    ap.add_argument("--skip-plain", action="store_true", help="skip the plain route (it holds the fp32 model)")
    ap.add_argument("--skip-multi", action="store_true", help="skip the --multi-lora row")
    ap.add_argument("--skip-cached", action="store_true", help="skip the graph-cached row")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10, help="ORT latency runs (0: skip the latency rows)")
    a = ap.parse_args()
    export = a.export_dtype or DEFAULT_EXPORT[a.size]
    dtypes = [d.strip() for d in (a.base_dtype or DEFAULT_DTYPES[a.size]).split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPE_NAMES]
    if bad:
        raise SystemExit(f"--base-dtype: unknown {bad} (fp32, bf16, fp16)")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="loraport-onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    adapter = build_adapter(work / "adapter", a.size)
    bases = {d: build_base(work / f"base-{d}", a.size, d) for d in dtypes}
    merged = {}
    if not a.skip_plain:
        from loraport.merging import merge

        for d, base in bases.items():
            merged[d] = work / f"merged-{d}"
            if not (merged[d] / "config.json").is_file():
                merge(base, [(adapter, 1.0)], merged[d])  # the plain route starts from an already merged model
    nparams = sum(int(__import__("math").prod(s)) for s in shapes(a.size).values())
    print(f"model: {a.size} Llama-shaped, {nparams / 1e6:.0f}M params, base dtypes {', '.join(dtypes)}; "
          f"r=16 all-linear LoRA (fp32); loraport rows export {export} ONNX, the plain row fp32; "
          f"built in {time.perf_counter() - t:.0f}s "
          f"under {work}")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}; best of {a.repeat} round(s)")

    py = sys.executable
    results: dict[str, dict[str, list[dict]]] = {d: {} for d in dtypes}
    for _ in range(a.repeat):
        for d, base in bases.items():
            rows = []
            if not a.skip_plain:
                rows.append((PLAIN, [py, __file__, "_plain", str(merged[d]), str(work / f"plain-{d}")],
                             work / f"plain-{d}", [merged[d]]))
            cli = [py, "-m", "loraport", "convert", "--to", "onnx", "--base", str(base), "--adapter", str(adapter),
                   "--dtype", export]
            rows.append((OURS, [*cli, "--out", str(work / f"onnx-{d}")], work / f"onnx-{d}", [base, adapter]))
            if not a.skip_cached:
                primed = work / f"graph-cache-{d}"
                if not primed.is_dir():  # one untimed export leaves this architecture's graph in the cache
                    measure([*cli, "--out", str(work / f"prime-{d}")], work / f"prime-{d}", primed)
                    shutil.rmtree(work / f"prime-{d}")
                rows.append((CACHED, [*cli, "--out", str(work / f"cached-{d}")], work / f"cached-{d}",
                             [base, adapter], primed))
            if not a.skip_multi:
                rows.append((MULTI, [*cli, "--multi-lora", "--out", str(work / f"multi-{d}")], work / f"multi-{d}",
                             [base, adapter]))
            for label, argv, out, inputs, *cache in rows:
                warm(inputs)
                results[d].setdefault(label, []).append(measure(argv, out, *cache))

    for d in dtypes:
        print(f"\n{d} base -> {export} ONNX")
        print(f"{'export route':48s} {'time s (best, spread)':>24s} {'peak RSS':>10s} {'peak anon':>10s}")
        for label, runs in results[d].items():
            w = [r["wall"] for r in runs]
            spread = f"{min(w):.1f} ({min(w):.1f}-{max(w):.1f})" if len(w) > 1 else f"{w[0]:.1f}"
            print(f"{label:48s} {spread:>24s} {gb(max(r['rss'] for r in runs)):>10s} "
                  f"{gb(max(r['anon'] for r in runs)):>10s}")
        if PLAIN in results[d]:
            p, o = results[d][PLAIN], results[d][OURS]
            tp, to = min(r["wall"] for r in p), min(r["wall"] for r in o)
            rp, ro = max(r["rss"] for r in p), max(r["rss"] for r in o)
            ap_, ao = max(r["anon"] for r in p), max(r["anon"] for r in o)
            print(f"loraport / plain ({d} base): time {to / tp:.2f}x, peak RSS {ro / rp:.2f}x, peak anon "
                  f"{ao / ap_:.2f}x   (goal: time <= 0.5x, RSS <= 0.3x)")
            if CACHED in results[d]:
                c = results[d][CACHED]
                tc, rc, ac = min(r["wall"] for r in c), max(r["rss"] for r in c), max(r["anon"] for r in c)
                print(f"loraport, graph cached / plain ({d} base): time {tc / tp:.2f}x, peak RSS {rc / rp:.2f}x, "
                      f"peak anon {ac / ap_:.2f}x")

    if a.runs > 0 and a.size != "8b" and not a.skip_multi:
        d = dtypes[0]
        multi = work / f"multi-{d}"
        lat = latencies({"merged": (work / f"onnx-{d}" / "model.onnx", None),
                         "multi": (multi / "model.onnx", multi / "adapters" / "adapter.onnx_adapter"),
                         "none": (multi / "model.onnx", None)}, a.seq, a.runs)
        lm, lm_multi, lm_none = lat["merged"], lat["multi"], lat["none"]
        print(f"\nORT CPU latency ({d} base export), batch 1 x seq {a.seq}, median of {a.runs}:")
        print(f"  merged graph                    {lm * 1e3:8.1f} ms")
        print(f"  multi-LoRA graph, adapter on    {lm_multi * 1e3:8.1f} ms  ({lm_multi / lm:.2f}x merged)")
        print(f"  multi-LoRA graph, no adapter    {lm_none * 1e3:8.1f} ms  ({lm_none / lm:.2f}x merged)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        plain_child(*sys.argv[2:4])
    else:
        main()
