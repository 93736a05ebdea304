"""GGUF re-quantization and int4 ONNX quality, side by side in one run.

1. Throughput: loraport's torch quantizers (loraport/quant/ggml.py) vs the gguf package's numpy reference
   (gguf.quants.quantize) on Llama-shaped weights, codes checked identical. MiB/s = MiB of fp32 input per
   second, best of --repeat runs (the fairest figure on a shared machine).
   k-quants (loraport/quant/ggml_kquants.py) vs libggml's own `ggml_quantize_chunk` (imatrix NULL, one thread,
   the library llama-cpp-python bundles, bound with ctypes by tests/_libggml.py; skipped without it), loraport
   on all cores and on one: codes identical, or the share of differing super-blocks and the error ratio.
   Ratios by wall time, and for the one-thread runs also by the thread's CPU time ("CPU ratio"), which the
   other jobs on a shared machine do not stretch.
2. int4 error per weight (RMS, relative to onnxruntime's own symmetric quantizer `quantize_matmul_4bits`)
   for loraport's former absmax/7 scale, onnxruntime symmetric / asymmetric, loraport's default (bit-exact with
   onnxruntime) and loraport's `search`, for blocks 16-256, on the fixture llama merged with its LoRA and on a
   heavy-tailed (Student-t, df 4) 2048×2048 matrix.

    python bench/gguf_bench.py                 # ~2 min on 2 cores
    python bench/gguf_bench.py --rows 4096 --cols 4096 --repeat 3 --krows 2048
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _libggml import load as load_libggml  # noqa: E402

from loraport.onnx.quantize import Int4Options, dequantize_int4, quantize_int4  # noqa: E402
from loraport.quant import ggml  # noqa: E402


def _best(*fns, repeat: int) -> list[float]:
    """Best wall time of each function over `repeat` rounds, the functions taking turns within a round: on a
    shared machine the load then weighs on all of them alike."""
    return _best_both(*fns, repeat=repeat)[0]


def _best_both(*fns, repeat: int) -> tuple[list[float], list[float]]:
    """(best wall times, best CPU times of the calling thread). For work that runs on the calling thread alone
    (numpy, libggml's one thread, loraport with workers=1) the CPU time is what the load does not stretch: a
    process descheduled by others' jobs loses wall time, not CPU time (caches shared with them still count)."""
    wall, cpu = [float("inf")] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall[i] = min(wall[i], time.perf_counter() - t0)
            cpu[i] = min(cpu[i], time.thread_time() - c0)
    return wall, cpu


def throughput(rows: int, cols: int, repeat: int) -> None:
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32) * 0.02
    xt = torch.from_numpy(x)
    mib = x.nbytes / 2**20
    print(f"\n== GGUF re-quantization, {rows}x{cols} fp32 ({mib:.0f} MiB), torch threads {torch.get_num_threads()}")
    print(f"{'type':6s} {'gguf.quants MiB/s':>18s} {'loraport MiB/s':>15s} {'ratio':>6s} {'1-thread MiB/s':>14s} "
          f"{'ratio':>6s} {'CPU ratio':>9s}  codes")
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        t = next(v for v in ggml.TYPES.values() if v.name == name)
        qt = gguf.GGMLQuantizationType[name]
        ref = gguf.quants.quantize(x, qt)
        ours = ggml.quantize(xt, t)
        same = np.array_equal(ref.reshape(-1).view(np.uint8), ours.numpy())
        (a, b, c), (ca, _, cc) = _best_both(lambda qt=qt: gguf.quants.quantize(x, qt),
                                            lambda t=t: ggml.quantize(xt, t),
                                            lambda t=t: ggml.quantize(xt, t, workers=1), repeat=repeat)
        print(f"{name:6s} {mib / a:18.0f} {mib / b:15.0f} {a / b:5.1f}x {mib / c:14.0f} {a / c:5.1f}x "
              f"{ca / cc:8.1f}x  {'identical' if same else 'DIFFER'}")


def _rms(raw: np.ndarray, t: ggml.GgmlType, x: np.ndarray) -> float:
    back = gguf.quants.dequantize(raw.reshape(x.shape[0], -1), gguf.GGMLQuantizationType(t.id))
    return float(np.sqrt(np.mean((back.astype(np.float64) - x) ** 2)))


def kquant_throughput(rows: int, cols: int, repeat: int) -> None:
    lib = load_libggml()
    if lib is None:
        print("\n== k-quants: llama-cpp-python (libggml) is not installed: not measured")
        return
    rng = np.random.default_rng(0)
    mats = {"gaussian": rng.standard_normal((rows, cols)).astype(np.float32) * 0.02,
            "student-t": (rng.standard_t(3, (rows, cols)) * 0.02).astype(np.float32)}
    mib = rows * cols * 4 / 2**20
    print(f"\n== k-quants vs libggml {lib.version} ggml_quantize_chunk (imatrix NULL, 1 thread), {rows}x{cols} fp32 "
          f"({mib:.0f} MiB) per matrix, torch threads {torch.get_num_threads()}")
    print(f"{'type':5s} {'weights':10s} {'libggml MiB/s':>13s} {'loraport MiB/s':>14s} {'ratio':>6s} "
          f"{'1-thread MiB/s':>14s} {'ratio':>6s} {'CPU ratio':>9s}  codes")
    for name in ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"):
        t = ggml.BY_NAME[name]
        for label, x in mats.items():
            xt = torch.from_numpy(x)
            ref, ours = lib.quantize(x, name), ggml.quantize(xt, t).numpy()
            diff = (ref.reshape(-1, t.nbytes) != ours.reshape(-1, t.nbytes)).any(1).mean()
            codes = "identical" if diff == 0 else \
                f"{diff:.2%} super-blocks differ, error ratio {_rms(ours, t, x) / _rms(ref, t, x):.4f}"
            (a, b, c), (ca, _, cc) = _best_both(lambda name=name, x=x: lib.quantize(x, name),
                                                lambda t=t, xt=xt: ggml.quantize(xt, t),
                                                lambda t=t, xt=xt: ggml.quantize(xt, t, workers=1), repeat=repeat)
            print(f"{name:5s} {label:10s} {mib / a:13.1f} {mib / b:14.1f} {a / b:5.2f}x {mib / c:14.1f} {a / c:5.2f}x"
                  f" {ca / cc:8.2f}x  {codes}")


def kquant_reading(rows: int, cols: int, repeat: int) -> None:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32) * 0.02)
    mib = x.numel() * 4 / 2**20
    print(f"\n== k-quant reading (dequantize), {rows}x{cols} ({mib:.0f} MiB of fp32 out)")
    print(f"{'type':5s} {'gguf.quants MiB/s':>18s} {'loraport MiB/s':>15s} {'ratio':>6s}  values")
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        t = ggml.BY_NAME[name]
        raw = ggml.quantize(x, t)
        blocks, qt = raw.numpy().reshape(-1, t.nbytes), gguf.GGMLQuantizationType(t.id)
        def ref(blocks=blocks, qt=qt):
            return gguf.quants.dequantize(blocks, qt)

        def ours(raw=raw, t=t):
            return ggml.dequantize(raw, t, x.shape)

        same = np.array_equal(ref().reshape(-1), ours().numpy().reshape(-1))
        a, b = _best(ref, ours, repeat=repeat)
        print(f"{name:5s} {mib / a:18.0f} {mib / b:15.0f} {a / b:5.1f}x  {'identical' if same else 'DIFFER'}")


def _ort(W: torch.Tensor, block: int, symmetric: bool) -> torch.Tensor:
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    N, K = W.shape
    kb = -(-K // block)
    w = np.ascontiguousarray(np.pad(W.t().numpy(), ((0, kb * block - K), (0, 0))), dtype=np.float32)
    p, s = np.zeros((N, kb, block // 2), np.uint8), np.zeros((N, kb), np.float32)
    z = np.zeros((N, (kb + 1) // 2), np.uint8)
    quantize_matmul_4bits(p, w, s, z, block, N, kb * block, symmetric)
    return dequantize_int4(torch.from_numpy(p), torch.from_numpy(s), None if symmetric else torch.from_numpy(z), K)


def _absmax7(W: torch.Tensor, block: int) -> torch.Tensor:
    """loraport's former int4 scale: absmax / 7, torch.round."""
    N, K = W.shape
    b = torch.nn.functional.pad(W, (0, (-K) % block)).reshape(N, -1, block)
    s = b.abs().amax(2, keepdim=True) / 7
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(b / s).clamp(-8, 7) * s).reshape(N, -1)[:, :K]


def _sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().square().sum())


def int4_table(mats: dict[str, list[torch.Tensor]]) -> None:
    print("\n== int4 RMS error per weight, relative to onnxruntime's symmetric quantizer (lower is better)")
    print(f"{'weights':16s} {'block':>5s} {'absmax/7':>9s} {'ORT sym':>8s} {'ORT asym':>9s} {'ours sym':>9s} "
          f"{'ours asym':>10s} {'search sym':>11s} {'search asym':>12s}")
    for label, Ws in mats.items():
        for block in (16, 32, 64, 128, 256):
            err = dict.fromkeys(("old", "os", "oa", "s", "a", "ss", "sa"), 0.0)
            for W in Ws:
                err["old"] += _sq(_absmax7(W, block), W)
                err["os"] += _sq(_ort(W, block, True), W)
                err["oa"] += _sq(_ort(W, block, False), W)
                for k, sym, search in (("s", True, False), ("a", False, False), ("ss", True, True),
                                       ("sa", False, True)):
                    P, S, Z = quantize_int4(W, Int4Options(block=block, symmetric=sym, search=search))
                    err[k] += _sq(dequantize_int4(P, S, Z, W.shape[1]), W)
            r = {k: (v / err["os"]) ** 0.5 for k, v in err.items()}
            print(f"{label:16s} {block:5d} {r['old']:9.3f} {r['os']:8.3f} {r['oa']:9.3f} {r['s']:9.3f} "
                  f"{r['a']:10.3f} {r['ss']:11.3f} {r['sa']:12.3f}")


def merged_llama() -> list[torch.Tensor]:
    from loraport.engine.apply import merged_tensor
    from loraport.engine.sources import open_base
    from loraport.manifest import HashCache
    from loraport.merging import _load_adapters, _plan

    root = Path(__file__).resolve().parents[1] / "fixtures" / "llm"
    base = open_base(root / "bases" / "llama")
    loaded, _ = _load_adapters([(root / "peft" / "llama_lora", 1.0)], base, None, True, "warn", HashCache.of(False))
    plan = _plan(base, loaded, True)
    return [merged_tensor(plan, n) for n in base.names() if len(base.info(n).shape) == 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--krows", type=int, default=1024, help="rows of the k-quant matrices (cols: --cols)")
    ap.add_argument("--skip-int4", action="store_true", help="only the GGUF throughput tables")
    args = ap.parse_args()
    throughput(args.rows, args.cols, args.repeat)
    kquant_throughput(args.krows, args.cols, args.repeat)
    kquant_reading(args.krows, args.cols, args.repeat)
    if args.skip_int4:
        print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        return
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(4.0).sample((2048, 2048)) * 0.02
    int4_table({"llama+LoRA": merged_llama(), "student-t 2048²": [heavy]})
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
