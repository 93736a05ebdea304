"""Benchmark: a merge into an fp8 base vs the same merge into its 16-bit original, side by side in one run,
with the peak memory of each (issue #19's goal: the fp8 merge within 1.2x of the 16-bit one).

A synthetic fp16 Llama-shaped model (bench/common.py) and an all-linear PEFT LoRA (r=16) are generated in a
temp folder; the fp8 bases are made from the fp16 one with loraport.quant.fp8 (the producers' rules: tested
against transformers and compressed-tensors in tests/test_fp8.py). Every row is its own child process,
started with its inputs in the page cache, the previous output deleted and synced.

Rows:  16-bit          fp16 base → fp16 output (the reference)
       fp8 block       DeepSeek / FineGrainedFP8 base (128x128 block scales) → the same layout
       fp8 channel     compressed-tensors base (per-channel bf16 scales) → the same layout
       fp8 → bf16      the block base with --dtype bf16 (a 16-bit output)
       --quantize fp8  the fp16 base quantized to the block layout while merging

    python bench/fp8_bench.py                  # 400m (~440 MB fp16)
    python bench/fp8_bench.py --size tiny      # seconds: a smoke run
    python bench/fp8_bench.py --repeat 3       # best of three per row
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PY, build_adapter, build_base, drop_written, gib, run_child, table, warm  # noqa: E402


def make_fp8(src: Path, dst: Path, kind: str) -> None:
    """`src` (fp16 HF folder) with every Linear weight in the fp8 layout `kind` ("block" or "channel")."""
    import torch

    from loraport.quant import fp8 as F
    from loraport.safetensors_io import save_file
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for k, v in load_file(src / shard).items():
            if k.endswith("proj.weight"):
                stem = k[: -len("weight")]
                if kind == "block":
                    out[k], out[stem + "weight_scale_inv"] = F.quantize_block(v)
                else:
                    out[k], out[stem + "weight_scale"] = F.quantize_ct(v.float(), "channel", torch.bfloat16)
                    index["weight_map"][stem + "weight_scale"] = shard
                if kind == "block":
                    index["weight_map"][stem + "weight_scale_inv"] = shard
            else:
                out[k] = v
        save_file(out, dst / shard, {"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]} if kind == "block" else {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}},
        "ignore": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="400m")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tmp", default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fp8bench-", dir=args.tmp))
    try:
        b16, lora = work / "base16", work / "lora"
        size = build_base(b16, args.size)
        build_adapter(lora, args.size, args.rank)
        make_fp8(b16, work / "block", "block")
        make_fp8(b16, work / "channel", "channel")
        rows_def = [("16-bit", b16, []), ("fp8 block", work / "block", []), ("fp8 channel", work / "channel", []),
                    ("fp8 → bf16", work / "block", ["--dtype", "bf16"]), ("--quantize fp8", b16, ["--quantize", "fp8"])]
        results = []
        for label, base, extra in rows_def:
            best = None
            for _ in range(args.repeat):
                out = work / "out"
                drop_written(out)
                warm([p for p in (base, lora) for p in p.rglob("*") if p.is_file()])
                r = run_child(label, [PY, "-m", "loraport", "merge", "--base", str(base), "--adapter", str(lora),
                                      "--out", str(out), "--no-manifest", *extra])
                if r.rc != 0:
                    raise SystemExit(f"{label}: exit {r.rc}\n{r.err[-2000:]}")
                best = r if best is None or r.wall < best.wall else best
            results.append(best)
        ref = results[0].wall
        print(f"fp8 merge bench, size {args.size} ({gib(size)} fp16), LoRA r={args.rank}, best of {args.repeat}")
        print(table([[r.label, f"{r.wall:.2f}", f"{r.wall / ref:.2f}x", f"{r.cpu:.1f}", gib(r.anon)]
                     for r in results], ["row", "wall s", "vs 16-bit", "cpu s", "peak anon"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
