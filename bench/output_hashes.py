"""Byte-identity check for engine refactors: runs a fixed set of `loraport` commands on the committed fixtures
and on a small bench-generated model, and records the sha256 of every output file.

    python bench/output_hashes.py --out bench/results/output-hashes-before.json
    python bench/output_hashes.py --compare A.json B.json        # exit 1 when any output differs
    PYTHONPATH=/path/to/other/checkout python bench/output_hashes.py --out B.json   # that checkout's loraport

Manifests (`loraport-manifest.json`, `*.manifest.json`) are left out: they hold input paths and times. Other
outputs may hold the paths of their inputs (the provenance in safetensors metadata names the adapters): every
occurrence of the repository root and of the scratch folder is replaced by a placeholder before hashing, and a
safetensors file is hashed without its 8-byte header length, so the digests compare across checkouts. Every
command runs in this process through click's CliRunner, with a private cache folder (no input-hash or graph
cache from earlier runs is reused).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: `PYTHONPATH=<other checkout> python bench/output_hashes.py`

FIX = "fixtures"
P = f"{FIX}/peft"
LLAMA = f"{P}/bases/llama"
SD = f"{FIX}/sd"
Q = f"{FIX}/quant"

# label -> argv (paths relative to the repository root; "@W/" = the scratch folder; outputs go to @W/out/<label>)
MERGES: list[tuple[str, list[str]]] = [
    ("llama-plain", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain"]),
    ("llama-plain-fp16", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--dtype", "fp16"]),
    ("llama-plain-bf16", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--dtype", "bf16"]),
    ("llama-dora", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_dora"]),
    ("llama-embed", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_embed"]),
    ("llama-mts", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_mts"]),
    ("llama-rslora", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_rslora_patterns"]),
    ("llama-2-weights", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--weight", "0.7",
                         "--adapter", f"{P}/adapters/llama_plain2", "--weight", "-0.3"]),
    ("llama-3-fused", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--weight", "0.5",
                       "--adapter", f"{P}/adapters/llama_plain2", "--weight", "0.25",
                       "--adapter", f"{P}/adapters/llama_rslora_patterns", "--weight", "1.0"]),
    ("llama-sharded", ["--base", f"{P}/bases/llama_sharded", "--adapter", f"{P}/adapters/llama_plain"]),
    ("llama-shard-size", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--shard-size", "40KB"]),
    ("llama-nf4", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--quantize", "nf4"]),
    ("llama-nf4-dq", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--quantize", "nf4",
                      "--double-quant"]),
    ("llama-fp4-b128", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--quantize", "fp4",
                        "--blocksize", "128"]),
    ("llama-int8", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--quantize", "int8"]),
    ("llama-q-fp16", ["--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain", "--quantize", "fp16"]),
    ("qwen2-bf16-dora", ["--base", f"{P}/bases/qwen2_bf16", "--adapter", f"{P}/adapters/qwen2_dora_bf16"]),
    ("qwen2-bf16-plain-fp16", ["--base", f"{P}/bases/qwen2_bf16", "--adapter", f"{P}/adapters/qwen2_plain",
                               "--dtype", "fp16"]),
    ("qwen2-tied-head", ["--base", f"{P}/bases/qwen2_bf16", "--adapter", f"{P}/adapters/qwen2_tied_head"]),
    ("gpt2-conv1d", ["--base", f"{P}/bases/gpt2", "--adapter", f"{P}/adapters/gpt2_conv1d"]),
    ("gpt2-dora", ["--base", f"{P}/bases/gpt2", "--adapter", f"{P}/adapters/gpt2_dora"]),
    ("gpt2-tied-embed", ["--base", f"{P}/bases/gpt2", "--adapter", f"{P}/adapters/gpt2_tied_embed"]),
    ("conv-lora-file", ["--base", f"{P}/bases/conv/model.safetensors", "--adapter", f"{P}/adapters/conv_lora"],),
    ("conv-dora-file", ["--base", f"{P}/bases/conv/model.safetensors", "--adapter", f"{P}/adapters/conv_dora"]),
    # LLM adapter formats into the llm fixture bases
    ("llm-mlx", ["--base", f"{FIX}/llm/bases/llama", "--adapter", f"{FIX}/llm/mlx/llama_lora"]),
    ("llm-mlx-dora", ["--base", f"{FIX}/llm/bases/llama", "--adapter", f"{FIX}/llm/mlx/llama_dora"]),
    ("llm-mlx-moe", ["--base", f"{FIX}/llm/bases/qwen2moe", "--adapter", f"{FIX}/llm/mlx/qwen2moe_switch"]),
    ("llm-gguf", ["--base", f"{FIX}/llm/bases/llama", "--adapter", f"{FIX}/llm/gguf/llama_lora.gguf"]),
    ("llm-torchtune", ["--base", f"{FIX}/llm/bases/llama", "--adapter", f"{FIX}/llm/torchtune/llama_lora"]),
    ("llm-peft-dora", ["--base", f"{FIX}/llm/bases/llama", "--adapter", f"{FIX}/llm/peft/llama_dora"]),
    # bitsandbytes bases (served dequantized; re-quantized with --quantize)
    ("bnb-nf4-base", ["--base", f"{Q}/llama-nf4-dq", "--adapter", f"{Q}/lora-small"]),
    ("bnb-nf4-base-requant", ["--base", f"{Q}/llama-nf4-dq", "--adapter", f"{Q}/lora-small", "--quantize", "nf4"]),
    ("bnb-nf4-fp16-base", ["--base", f"{Q}/llama-nf4-dq", "--adapter", f"{Q}/lora-small", "--quantize", "nf4",
                           "--fp16-base", f"{Q}/llama-bf16"]),
    ("bnb-int8-base", ["--base", f"{Q}/llama-int8", "--adapter", f"{Q}/lora-small"]),
    ("bnb-int8-base-requant", ["--base", f"{Q}/llama-int8", "--adapter", f"{Q}/lora-small", "--quantize", "int8"]),
    # bench-generated sharded Llama (4 MB shards) and an r=8 all-linear adapter
    ("bench-tiny", ["--base", "@W/tiny", "--adapter", "@W/tiny-lora"]),
    ("bench-tiny-shard", ["--base", "@W/tiny", "--adapter", "@W/tiny-lora", "--shard-size", "3MB"]),
    ("bench-tiny-bf16", ["--base", "@W/tiny", "--adapter", "@W/tiny-lora", "--dtype", "bf16"]),
    ("bench-tiny-nf4", ["--base", "@W/tiny", "--adapter", "@W/tiny-lora", "--quantize", "nf4"]),
]

SD_ADAPTERS = ["kohya_peft", "diffusers_peft", "diffusers_legacy", "lycoris_loha", "lycoris_lokr",
               "lycoris_lokr_full", "lycoris_ia3", "lycoris_locon_tucker_dora_in", "lycoris_loha_dora_out"]
for _a in SD_ADAPTERS:
    MERGES.append((f"sd-folder-{_a}", ["--base", f"{SD}/base", "--adapter", f"{SD}/{_a}.safetensors"]))
for _a in ("kohya_peft", "lycoris_loha", "lycoris_lokr_tucker"):
    MERGES.append((f"sd-single-{_a}", ["--base", "@W/sd-single.safetensors", "--adapter", f"{SD}/{_a}.safetensors"]))
MERGES.append(("sd-folder-2-weights", ["--base", f"{SD}/base", "--adapter", f"{SD}/kohya_peft.safetensors",
                                       "--weight", "0.6", "--adapter", f"{SD}/lycoris_loha.safetensors",
                                       "--weight", "0.4", "--dtype", "fp16"]))

ONNX: list[tuple[str, list[str]]] = [
    ("onnx-export", ["convert", "--to", "onnx", "--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain"]),
    ("onnx-export-int8", ["convert", "--to", "onnx", "--base", LLAMA, "--adapter", f"{P}/adapters/llama_plain",
                          "--quantize", "int8"]),
    ("onnx-export-fp16", ["convert", "--to", "onnx", "--base", LLAMA, "--adapter", f"{P}/adapters/llama_dora",
                          "--dtype", "fp16"]),
    ("onnx-export-gpt2", ["convert", "--to", "onnx", "--base", f"{P}/bases/gpt2", "--adapter",
                          f"{P}/adapters/gpt2_conv1d"]),
    # bake a second adapter into the first export (names kept by loraport's exporter)
    ("onnx-bake", ["merge", "--base", "@W/out/onnx-export/model.onnx", "--adapter", f"{P}/adapters/llama_plain2"]),
]


def _prepare(work: Path) -> None:
    """The bench-made Llama and adapter, and the SD single file made from the committed diffusers fixture."""
    from bench.common import build_adapter, build_base
    from safetensors.torch import load_file

    from loraport.safetensors_io import save_file
    from tests._sd_util import to_single_file

    build_base(work / "tiny", "tiny", seed=3)
    build_adapter(work / "tiny-lora", "tiny", rank=8, seed=4)
    flat = {}
    for comp, fname in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        for k, v in load_file(ROOT / SD / "base" / comp / f"{fname}.safetensors").items():
            flat[f"{comp}.{k}"] = v
    sf = to_single_file(flat, xl=False)
    save_file({k: v.contiguous() for k, v in sf.items()}, work / "sd-single.safetensors")


def _argv(args: list[str], work: Path) -> list[str]:
    return [a.replace("@W", str(work)) if a.startswith("@W") else
            (str(ROOT / a) if a.startswith(FIX + "/") else a) for a in args]


def _digest(path: Path, subs: list[tuple[bytes, bytes]]) -> str:
    data = path.read_bytes()
    if path.suffix == ".safetensors" and len(data) >= 8:
        n = int.from_bytes(data[:8], "little")
        header, body = data[8:8 + n], data[8 + n:]
    else:
        header, body = data, b""
    for a, b in subs:
        header = header.replace(a, b)
    header = header.rstrip(b" ")  # safetensors pads its header to 8 bytes: the padding follows the paths' length
    h = hashlib.sha256(header)
    h.update(body)
    return h.hexdigest()


def _is_manifest(p: Path) -> bool:
    return p.name == "loraport-manifest.json" or p.name.endswith(".manifest.json")


def _outputs(out: Path) -> list[Path]:
    if out.is_dir():
        return sorted(f for f in out.rglob("*") if f.is_file() and not _is_manifest(f))
    sibs = [f for f in out.parent.iterdir() if f.is_file() and f.name.startswith(out.name) and not _is_manifest(f)]
    return sorted(sibs)


def run_all(work: Path, only: set[str] | None = None) -> dict[str, dict[str, str]]:
    from click.testing import CliRunner

    from loraport.cli import main

    _prepare(work)
    (work / "out").mkdir()
    subs = [(str(work).encode(), b"<WORK>"), (str(ROOT).encode(), b"<ROOT>")]
    results: dict[str, dict[str, str]] = {}
    jobs = [(label, ["merge", *args]) for label, args in MERGES] + ONNX
    for label, args in jobs:
        if only and label not in only:
            continue
        single = any(a.endswith((".safetensors", ".onnx")) for a in args[args.index("--base") + 1:][:1])
        out = work / "out" / (label + (".onnx" if args[args.index("--base") + 1].endswith(".onnx") else
                                       ".safetensors" if single else ""))
        argv = _argv(args, work) + ["--out", str(out)]
        r = CliRunner().invoke(main, argv, catch_exceptions=True)
        if r.exit_code != 0:
            results[label] = {"error": f"exit {r.exit_code}: {(r.stderr or r.output).strip()[-300:]}"}
            print(f"{label}: FAILED {results[label]['error']}", file=sys.stderr)
            continue
        files = _outputs(out)
        base = out if out.is_dir() else out.parent
        results[label] = {str(f.relative_to(base)): _digest(f, subs) for f in files}
        print(f"{label}: {len(files)} file(s)", file=sys.stderr)
    return results


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for label in sorted(set(a) | set(b)):
        x, y = a.get(label), b.get(label)
        if x != y:
            if x is None or y is None:
                diffs.append(f"{label}: only in {'B' if x is None else 'A'}")
                continue
            for f in sorted(set(x) | set(y)):
                if x.get(f) != y.get(f):
                    diffs.append(f"{label}/{f}: {x.get(f)} != {y.get(f)}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the digests as JSON here")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="diff two digest files")
    ap.add_argument("--only", action="append", help="run only this label (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    a = ap.parse_args(argv)
    if a.compare:
        diffs = compare(*(json.loads(p.read_text()) for p in a.compare))
        print("\n".join(diffs) if diffs else f"identical: {a.compare[0]} == {a.compare[1]}")
        return 1 if diffs else 0
    work = Path(tempfile.mkdtemp(prefix="loraport-hashes-"))
    os.environ["LORAPORT_CACHE_DIR"] = str(work / "cache")
    os.environ["LORAPORT_NO_GRAPH_CACHE"] = "1"
    try:
        res = run_all(work, set(a.only) if a.only else None)
    finally:
        if a.keep:
            print(f"scratch: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=1, sort_keys=True) + "\n"
    if a.out:
        a.out.write_text(text)
    else:
        print(text)
    return 1 if any("error" in v for v in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
