"""Quantization throughput: loraport's own quantizers vs bitsandbytes' CPU ops, side by side, on Llama-shaped
linear weights (bf16), with the codes checked identical; then the wall time `--quantize nf4` adds to a merge.

    python bench/quant_bench.py                    # one Llama-3.2-1B-shaped decoder layer (121 MB bf16)
    python bench/quant_bench.py --shape 7b --layers 1
    python bench/quant_bench.py --no-merge         # throughput table only

MiB/s = MiB of bf16 input weights per second (the same input for both sides). Peak RSS is printed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraport.quant.blockwise import quantize_4bit, quantize_absmax  # noqa: E402
from loraport.quant.rowwise import quantize_int8  # noqa: E402

SHAPES = {  # (hidden, intermediate, kv_dim)
    "1b": (2048, 8192, 512),
    "7b": (4096, 11008, 4096),
    "8b": (4096, 14336, 1024),
}


def layer_shapes(hidden: int, inter: int, kv: int) -> dict[str, tuple[int, int]]:
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, weights, repeats: int = 5):
    """Best of `repeats` passes over all weights (after a warm-up call), and the outputs of the last pass."""
    fn(weights[0])  # warm-up (tables, allocator)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        outs = [fn(w) for w in weights]
        best = min(best, time.perf_counter() - t)
    return best, outs


def throughput(weights: list[torch.Tensor]) -> list[tuple]:
    buf = io.StringIO()
    with redirect_stderr(buf), redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as F
    mib = sum(w.numel() * w.element_size() for w in weights) / 2**20
    rows = []

    def ours_4bit(qt, dq):
        def f(w):
            p, am = quantize_4bit(w, qt, 64)
            return (p, quantize_absmax(am)[0]) if dq else (p, am)
        return f

    def bnb_4bit(qt, dq):
        def f(w):
            q, st = F.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
            return q, st.absmax
        return f

    for label, qt, dq in [("nf4", "nf4", False), ("nf4 + double quant", "nf4", True), ("fp4", "fp4", False)]:
        t_ours, o = timed(ours_4bit(qt, dq), weights)
        t_bnb, b = timed(bnb_4bit(qt, dq), weights)
        same = all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(o, b))
        rows.append((label, mib / t_ours, mib / t_bnb, same))

    def bnb_int8(w):
        CB, SCB, _ = F.int8_vectorwise_quant(w.to(torch.float16))  # transformers quantizes the fp16 copy
        return CB, SCB

    t_ours, o = timed(quantize_int8, weights)
    t_bnb, b = timed(bnb_int8, weights)
    same = all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(o, b))
    rows.append(("int8 row-wise", mib / t_ours, mib / t_bnb, same))
    return rows


def merge_overhead(shapes: dict, layers: int, rank: int = 16) -> list[tuple]:
    """Wall time of loraport merge (bf16 out) vs --quantize nf4 (with and without the report metrics) on a
    synthetic Llama-shaped checkpoint with a rank-16 PEFT LoRA on every linear layer."""
    from loraport.merging import merge
    from loraport.safetensors_io import save_file

    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as td:
        base, ad = Path(td) / "base", Path(td) / "lora"
        base.mkdir()
        ad.mkdir()
        hidden = next(iter(shapes.values()))[1]
        tensors, lora = {}, {}
        for i in range(layers):
            for mod, (o, n) in shapes.items():
                key = f"model.layers.{i}.{mod}"
                tensors[key + ".weight"] = (torch.randn(o, n, generator=g) * 0.02).to(torch.bfloat16)
                lora[f"base_model.model.{key}.lora_A.weight"] = torch.randn(rank, n, generator=g) * 0.01
                lora[f"base_model.model.{key}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.01
            tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        save_file(tensors, base / "model.safetensors", {"format": "pt"})
        (base / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "torch_dtype": "bfloat16", "hidden_size": hidden}))
        save_file(lora, ad / "adapter_model.safetensors", {"format": "pt"})
        (ad / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": [m.split(".")[-1] for m in shapes],
            "base_model_name_or_path": "bench", "fan_in_fan_out": False, "use_rslora": False}))
        runs = [("bf16 merge", {}), ("--quantize nf4 (report on)", {"quantize": "nf4"}),
                ("--quantize nf4 --double-quant", {"quantize": "nf4", "quant_options": {"double_quant": True}}),
                ("--quantize nf4 (metrics off)", {"quantize": "nf4", "quant_options": {"metrics": False}}),
                ("--quantize int8", {"quantize": "int8"})]
        out = []
        for label, kw in runs:
            best = float("inf")
            for rep in range(2):
                t = time.perf_counter()
                merge(base, [ad], Path(td) / f"out{len(out)}{rep}", device="cpu", **kw)
                best = min(best, time.perf_counter() - t)
            out.append((label, best))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--merge-layers", type=int, default=2, help="decoder layers in the merge-overhead model")
    ap.add_argument("--no-merge", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = layer_shapes(*SHAPES[a.shape])
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
               for _ in range(a.layers) for s in shapes.values()]
    mib = sum(w.numel() * 2 for w in weights) / 2**20
    import os

    print(f"quantize throughput: {len(weights)} Llama-{a.shape} linear weights, {mib:.0f} MiB bf16, "
          f"{torch.get_num_threads()} threads, blocksize 64 (load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs)")
    print(f"{'':22s} {'loraport MiB/s':>15s} {'bitsandbytes MiB/s':>19s} {'ratio':>7s}  codes identical")
    for label, ours, bnb, same in throughput(weights):
        print(f"{label:22s} {ours:15.0f} {bnb:19.0f} {ours / bnb:6.1f}x  {'yes' if same else 'NO'}")
    if not a.no_merge:
        ms = layer_shapes(*SHAPES[a.shape])
        size = sum(o * n for o, n in ms.values()) * 2 * a.merge_layers / 2**20
        print(f"\nmerge wall time: {a.merge_layers} Llama-{a.shape} layers ({size:.0f} MiB bf16), rank-16 LoRA on "
              f"every linear layer, best of 2")
        res = merge_overhead(ms, a.merge_layers)
        t0 = res[0][1]
        for label, t in res:
            rel = "" if t is t0 else f"{(t / t0 - 1) * 100:+.0f}% vs bf16 merge ({t / t0:.2f}x)"
            print(f"{label:32s} {t:7.2f} s  {rel}")
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
