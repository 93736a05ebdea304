"""ONNX export benchmark: loraport's streaming export vs the plain route, and ORT latency merged vs multi-LoRA.

    python bench/onnx_bench.py                 # ~220M-parameter Llama-shaped model (fp32), r=16 all-linear LoRA
    python bench/onnx_bench.py --size 8b       # Llama-8B-shaped synthetic model (fp16): needs ~35 GB of disk

Rows (each route runs in its own process, so its peak RSS is its own):
  plain     load the merged fp32 model with transformers, torch.onnx.export(dynamo=True), save (external data)
  loraport  loraport convert --to onnx (graph captured weights-free, merged weights streamed to model.onnx.data)
  multi     loraport convert --to onnx --multi-lora (graph + .onnx_adapter)
then onnxruntime CPU latency of the merged graph vs the multi-LoRA graph with its adapter active.
The synthetic weights are random (std 0.02) and written tensor by tensor; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, dtype="float32"),
    "220m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=16, dtype="float32"),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, dtype="float16"),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(work: Path, size: str, rank: int = 16) -> tuple[Path, Path]:
    from loraport.safetensors_io import StreamingWriter, save_file

    cfg = dict(SIZES[size])
    dtype = getattr(torch, cfg.pop("dtype"))
    base, adapter = work / "base", work / "adapter"
    if (base / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return base, adapter
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    h, inter, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    g = torch.Generator().manual_seed(0)
    w = StreamingWriter(base / "model.safetensors", [(n, dtype, s) for n, s in shapes.items()], {"format": "pt"})
    lora = {}
    for n, s in shapes.items():
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
        w.write(n, t.to(dtype))
        if any(f".{m}." in n for m in TARGETS):
            mod = n[: -len(".weight")]
            lora[f"base_model.model.{mod}.lora_A.weight"] = (torch.randn(rank, s[1], generator=g) * 0.02).to(dtype)
            lora[f"base_model.model.{mod}.lora_B.weight"] = (torch.randn(s[0], rank, generator=g) * 0.02).to(dtype)
    w.close()
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).split(".")[1], **cfg}))
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "task_type": "CAUSAL_LM", "base_model_name_or_path": None}))
    return base, adapter


# ---------------------------------------------------------------------------------------------- children
def child(route: str, base: str, adapter: str, out: str, extra: str) -> None:
    t0 = time.perf_counter()
    if route == "plain":
        import transformers

        m = transformers.AutoModelForCausalLM.from_pretrained(extra, dtype=torch.float32).eval()
        m.config.use_cache = False
        ids = torch.zeros(2, 8, dtype=torch.int64)
        dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        prog = torch.onnx.export(m, (), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                 dynamo=True, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                 dynamic_shapes=dyn)
        Path(out).mkdir()
        prog.save(str(Path(out) / "model.onnx"), external_data=True)
    else:
        from loraport.onnx import export_onnx

        export_onnx(base, [(adapter, 1.0)], out, multi_lora=(route == "multi"), dtype=extra or "fp32")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": rss}))


def run_child(route: str, base: Path, adapter: Path, out: Path, extra: str = "") -> dict:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "_child", route, str(base), str(adapter), str(out), extra],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{route} failed:\n{r.stderr[-3000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["wall"] = wall
    return d


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(SIZES), default="220m")
    ap.add_argument("--work", default=None, help="folder for the synthetic model and outputs (default: a temp dir)")
    ap.add_argument("--skip-plain", action="store_true", help="skip the plain route (it needs ~3x the fp32 weights)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="loraport-onnx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base, adapter = build(work, a.size)
    from loraport.checkpoint import Checkpoint

    ck = Checkpoint.open(base)
    nparams = sum(torch.Size(ck.info(n).shape).numel() for n in ck.names())
    ck.close()
    print(f"model: {a.size} Llama-shaped, {nparams / 1e6:.0f}M params ({SIZES[a.size]['dtype']}), r=16 all-linear "
          f"LoRA; built in {time.perf_counter() - t:.0f}s under {work}")
    dtype = "fp16" if SIZES[a.size]["dtype"] == "float16" else "fp32"
    rows = {}
    if not a.skip_plain:
        merged = work / "merged-st"
        if not merged.exists():
            from loraport.merge import merge

            merge(base, [(adapter, 1.0)], merged)  # the plain route starts from an already merged model
        rows["plain (transformers load + torch.onnx dynamo)"] = run_child("plain", base, adapter, work / "plain",
                                                                          str(merged))
    rows["loraport convert --to onnx"] = run_child("merged", base, adapter, work / "onnx-merged", dtype)
    rows["loraport convert --to onnx --multi-lora"] = run_child("multi", base, adapter, work / "onnx-multi", dtype)
    print(f"\n{'export route':48s} {'time s':>8s} {'peak RSS':>10s}")
    for k, v in rows.items():
        print(f"{k:48s} {v['seconds']:8.1f} {v['peak_rss'] / 1e9:8.2f} GB")
    if not a.skip_plain:
        p, o = rows["plain (transformers load + torch.onnx dynamo)"], rows["loraport convert --to onnx"]
        print(f"loraport / plain: time {o['seconds'] / p['seconds']:.2f}x, "
              f"peak RSS {o['peak_rss'] / p['peak_rss']:.2f}x (goal <= 0.5x, <= 0.3x)")
    if a.size != "8b":
        multi = work / "onnx-multi"
        lat = latencies({"merged": (work / "onnx-merged" / "model.onnx", None),
                         "multi": (multi / "model.onnx", multi / "adapters" / "adapter.onnx_adapter"),
                         "none": (multi / "model.onnx", None)}, a.seq, a.runs)
        lm, lm_multi, lm_none = lat["merged"], lat["multi"], lat["none"]
        print(f"\nORT CPU latency, batch 1 x seq {a.seq}, median of {a.runs}:")
        print(f"  merged graph                    {lm * 1e3:8.1f} ms")
        print(f"  multi-LoRA graph, adapter on    {lm_multi * 1e3:8.1f} ms  ({lm_multi / lm:.2f}x merged)")
        print(f"  multi-LoRA graph, no adapter    {lm_none * 1e3:8.1f} ms  ({lm_none / lm:.2f}x merged)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(*sys.argv[2:7])
    else:
        main()
