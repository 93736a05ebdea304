"""sha256 of the outputs of a fixed set of CLI commands on the committed fixtures, to prove that a refactor of
the delta classes changes no byte (issue 16). Run it before and after and compare the printed lists:

    python bench/delta_output_hashes.py > before.txt   # ... change ...
    python bench/delta_output_hashes.py > after.txt && diff before.txt after.txt

Manifests are skipped (--no-manifest): they record times, not the merge. To compare with another commit, run
the script from a copy of that commit (`git archive COMMIT | tar -x -C DIR`, then `DIR/bench/...`). Each
command runs in a child process with the same interpreter, PYTHONPATH = the root of the checkout it lies in.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
F = ROOT / "fixtures"
SD = F / "sd"

# name -> CLI arguments; "{out}" is replaced by a fresh output path
COMMANDS: dict[str, list[str]] = {
    "merge-peft-llama": ["merge", "--base", f"{F}/peft/bases/llama", "--adapter", f"{F}/peft/adapters/llama_plain"],
    "merge-peft-llama-two": ["merge", "--base", f"{F}/peft/bases/llama", "--adapter",
                             f"{F}/peft/adapters/llama_plain", "--adapter", f"{F}/peft/adapters/llama_plain2",
                             "--weight", "0.7", "--weight", "-0.4"],
    "merge-peft-llama-three": ["merge", "--base", f"{F}/peft/bases/llama", "--adapter",  # fused GEMM path
                               f"{F}/peft/adapters/llama_plain", "--adapter", f"{F}/peft/adapters/llama_plain2",
                               "--adapter", f"{F}/peft/adapters/llama_rslora_patterns", "--weight", "0.7",
                               "--weight", "-0.4", "--weight", "0.5"],
    "merge-peft-llama-dora": ["merge", "--base", f"{F}/llm/bases/llama", "--adapter", f"{F}/llm/peft/llama_dora"],
    "merge-peft-gpt2-conv1d": ["merge", "--base", f"{F}/peft/bases/gpt2", "--adapter",
                               f"{F}/peft/adapters/gpt2_conv1d"],
    "merge-peft-mts": ["merge", "--base", f"{F}/peft/bases/llama", "--adapter", f"{F}/peft/adapters/llama_mts"],
    "merge-mlx-moe": ["merge", "--base", f"{F}/llm/bases/qwen2moe", "--adapter", f"{F}/llm/mlx/qwen2moe_switch"],
    "merge-kohya-sd": ["merge", "--base", f"{SD}/base", "--adapter", f"{SD}/kohya_peft.safetensors"],
    "merge-lycoris-loha-sd": ["merge", "--base", f"{SD}/base", "--adapter", f"{SD}/lycoris_loha.safetensors"],
    "merge-lycoris-lokr-tucker-sd": ["merge", "--base", f"{SD}/base", "--adapter",
                                     f"{SD}/lycoris_lokr_tucker.safetensors"],
    "merge-lycoris-locon-dora-sd": ["merge", "--base", f"{SD}/base", "--adapter",
                                    f"{SD}/lycoris_locon_tucker_dora_in.safetensors"],
    "merge-lycoris-ia3-sd": ["merge", "--base", f"{SD}/base", "--adapter", f"{SD}/lycoris_ia3.safetensors"],
    "convert-peft-kohya-sd": ["convert", f"{SD}/diffusers_peft.safetensors", "--to", "kohya", "--base", f"{SD}/base"],
    "convert-peft-gguf": ["convert", f"{F}/llm/peft/llama_lora", "--to", "gguf", "--base", f"{F}/llm/bases/llama"],
    "convert-peft-mlx": ["convert", f"{F}/llm/peft/llama_lora", "--to", "mlx"],
    "convert-dora-gguf-lossy": ["convert", f"{F}/llm/peft/llama_dora", "--to", "gguf", "--base",
                                f"{F}/llm/bases/llama", "--lossy"],
    "convert-loha-peft-lossy": ["convert", f"{SD}/lycoris_loha.safetensors", "--to", "peft", "--base",
                                f"{SD}/base", "--lossy"],
    "convert-locon-diffusers-rank2": ["convert", f"{SD}/lycoris_locon_tucker_dora_in.safetensors", "--to",
                                      "diffusers", "--base", f"{SD}/base", "--lossy", "--rank", "2"],
    "convert-kohya-diffusers": ["convert", f"{SD}/kohya_peft.safetensors", "--to", "diffusers", "--base",
                                f"{SD}/base"],
    "convert-moe-gguf": ["convert", f"{F}/llm/mlx/qwen2moe_switch", "--to", "gguf", "--base",
                         f"{F}/llm/bases/qwen2moe"],
    "resize-peft-rank2": ["resize", f"{F}/peft/adapters/llama_plain", "--rank", "2", "--device", "cpu"],
    "resize-dora-rank2": ["resize", f"{F}/llm/peft/llama_dora", "--rank", "2", "--device", "cpu"],
    "combine-svd": ["combine", f"{F}/peft/adapters/llama_plain", f"{F}/peft/adapters/llama_plain2", "--weights",
                    "0.7,0.3", "--method", "svd", "--device", "cpu"],
    "combine-cat": ["combine", f"{F}/peft/adapters/llama_plain", f"{F}/peft/adapters/llama_plain2", "--method",
                    "cat", "--device", "cpu"],
}

# name -> CLI arguments whose JSON report on stdout is hashed (the repository root replaced by "<ROOT>")
REPORTS: dict[str, list[str]] = {
    f"inspect-{p.name}": ["inspect", str(p), "--json"]
    for p in (F / "peft/adapters/llama_mts", F / "llm/peft/llama_dora", F / "llm/mlx/qwen2moe_switch",
              SD / "lycoris_loha_dora_out.safetensors", SD / "lycoris_lokr_full.safetensors",
              SD / "lycoris_ia3.safetensors", SD / "lycoris_locon_tucker_dora_in.safetensors")
}

OUT_NAME = {"convert-peft-gguf": "a.gguf", "convert-moe-gguf": "a.gguf", "convert-dora-gguf-lossy": "a.gguf",
            "convert-peft-kohya-sd": "a.safetensors", "convert-kohya-diffusers": "a.safetensors",
            "convert-locon-diffusers-rank2": "a.safetensors"}


def _normalized(data: bytes) -> bytes:
    """A safetensors file with the root replaced in its header and the header's padding dropped."""
    n = int.from_bytes(data[:8], "little")
    return data[8: 8 + n].rstrip(b" ").replace(str(ROOT).encode(), b"<ROOT>") + data[8 + n:]


def digest(path: Path) -> str:
    """One sha256 over every file under `path` (relative name + bytes), manifests excluded. The repository root
    (recorded in merged files' provenance) is replaced by "<ROOT>", so two checkouts compare equal."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        if "manifest" in p.name:
            continue
        h.update(str(p.relative_to(path) if p != path else p.name).encode() + b"\0")
        h.update(_normalized(p.read_bytes()) if p.suffix == ".safetensors" else p.read_bytes())
    return h.hexdigest()


def main() -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAPORT_CACHE_DIR": tempfile.mkdtemp(prefix="lp-cache-")}
    bad = 0
    for name, args in REPORTS.items():
        r = subprocess.run([sys.executable, "-m", "loraport", *args], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            bad += 1
            print(f"{name}  FAILED rc={r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
            continue
        print(f"{name}  {hashlib.sha256(r.stdout.replace(str(ROOT), '<ROOT>').encode()).hexdigest()}")
    for name, args in COMMANDS.items():
        with tempfile.TemporaryDirectory(prefix="lp-hash-") as tmp:
            out = Path(tmp) / OUT_NAME.get(name, "out")
            extra = ["--no-manifest"] if args[0] == "merge" else []
            cmd = [sys.executable, "-m", "loraport", *args, "--out", str(out), *extra]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0 or not out.exists():
                bad += 1
                print(f"{name}  FAILED rc={r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
                continue
            print(f"{name}  {digest(out)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
