"""Shared pieces of the merge benchmarks: synthetic Llama-shaped checkpoints and PEFT adapters built from
local random data, and a child-process runner that records wall time and peak memory.

Memory is measured two ways, because a memory-mapped reader's resident set includes file pages that are
really page cache:
* `anon` — the peak of RssAnon (private anonymous memory: what the process allocated) sampled from
  /proc/<pid>/status every 10 ms by a thread of the parent. This is "peak RSS, page cache excluded".
* `hwm`  — the kernel's high-water mark of the whole RSS (VmHWM, file-backed mapped pages included), from
  the same samples (it is monotonic, so only its last ≤10 ms before exit can be missed).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# name -> (hidden, intermediate, layers, heads, kv heads, vocab, shard bytes); fp16 sizes in the comments
SIZES: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "tiny": (256, 688, 4, 8, 8, 4096, 4 << 20),  # ~12 MB, for tests
    "400m": (1024, 2816, 12, 16, 16, 32000, 200 << 20),  # ~440 MB, 3 shards
    "1.5g": (2048, 5632, 16, 32, 8, 32000, 500 << 20),  # ~1.7 GB
    "4g": (2560, 6912, 24, 20, 20, 32000, 2 << 30),  # ~4.1 GB
    "8b": (4096, 14336, 32, 32, 8, 128256, 5 << 30),  # Llama-3-8B shaped, ~16 GB
}


def shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, layers, heads, kv, vocab, _ = SIZES[size]
    hd = h // heads
    per = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h), "self_attn.v_proj": (kv * hd, h),
           "self_attn.o_proj": (h, heads * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
           "mlp.down_proj": (h, inter)}
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [(p + m + ".weight", s) for m, s in per.items()]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def config(size: str) -> dict:
    h, inter, layers, heads, kv, vocab, _ = SIZES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "silu",
            "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}


class _Pool:
    """Random fp16 values generated once; tensors are slices of it at random offsets (tiled when larger), so
    building a 16 GB checkpoint costs disk time, not randn time."""

    def __init__(self, seed: int, n: int = 1 << 25):
        import torch

        self.g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(n, generator=self.g) * 0.02).half()

    def take(self, shape: tuple[int, ...]):
        import torch

        n = math.prod(shape)
        size = self.pool.numel()
        off = int(torch.randint(0, size, (1,), generator=self.g))
        if n <= size - off:
            return self.pool[off:off + n].view(shape)
        reps = -(-(n + off) // size)
        return self.pool.repeat(reps)[off:off + n].view(shape)


def build_base(folder: Path, size: str, seed: int = 0) -> int:
    """A sharded HF Llama folder (config.json, shards, model.safetensors.index.json). Returns its bytes."""
    import torch

    from loraport.safetensors_io import StreamingWriter

    folder.mkdir(parents=True)
    pool = _Pool(seed)
    limit = SIZES[size][6]
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in shapes(size):
        n = math.prod(shape) * 2
        if groups[-1] and acc + n > limit:
            groups.append([])
            acc = 0
        groups[-1].append((name, shape))
        acc += n
    weight_map, total = {}, 0
    for i, grp in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        w = StreamingWriter(folder / fname, [(n, torch.float16, s) for n, s in grp], {"format": "pt"})
        for name, shape in grp:
            t = torch.ones(shape, dtype=torch.float16) if name.endswith("norm.weight") else pool.take(shape)
            w.write(name, t)
            weight_map[name] = fname
            total += t.numel() * 2
        w.close()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config(size), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return total


def build_adapter(folder: Path, size: str, rank: int, seed: int = 1, alpha: int | None = None) -> int:
    """An all-linear PEFT LoRA adapter (fp32 A and B, both random so B≠0). Returns its bytes."""
    import torch

    from loraport.safetensors_io import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes(size):
        mod = name.removesuffix(".weight")
        if not mod.endswith(tuple(LINEAR)):
            continue
        out_f, in_f = shape
        tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or 2 * rank,
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
           "target_modules": sorted({m.split(".")[-1] for m in LINEAR}), "base_model_name_or_path": None,
           "inference_mode": True, "init_lora_weights": False, "modules_to_save": None, "rank_pattern": {},
           "alpha_pattern": {}}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return sum(t.numel() * 4 for t in tensors.values())


def warm(paths: list[Path], chunk: int = 16 << 20) -> None:
    """Read every file once so the next run finds its inputs in the page cache (all rows equally warm)."""
    for p in paths:
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(chunk):
                    pass


def drop_written(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


@dataclass
class Run:
    label: str
    rc: int
    wall: float
    anon: int  # peak RssAnon, bytes (sampled)
    hwm: int  # peak VmHWM, bytes (file-backed mapped pages included)
    cpu: float = 0.0  # user + system CPU seconds of the child (exact: RUSAGE_CHILDREN before/after)
    gpu: dict | None = None  # GPU utilisation samples, when a CUDA row
    out: str = ""
    err: str = ""


def proc_status(pid: int, *fields: str) -> list[int]:
    """The given /proc/<pid>/status fields (e.g. "VmRSS", "RssAnon") in bytes; zeros once the process is gone."""
    got = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in got:
                    got[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return [got[k] for k in fields]


def _status(pid: int) -> tuple[int, int]:
    """(RssAnon, VmHWM) of a live process, bytes."""
    anon, hwm = proc_status(pid, "RssAnon", "VmHWM")
    return anon, hwm


def run_child(label: str, argv: list[str], *, mem_limit: int | None = None, timeout: float | None = None,
              env: dict | None = None) -> Run:
    """Run argv, sampling its RssAnon; mem_limit caps the child's address space (RLIMIT_AS), so a
    runaway child fails with MemoryError instead of taking the machine down."""

    def limit():
        if mem_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    env = {**os.environ, **(env or {})}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit,
                         env=env, cwd=ROOT)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon, hwm = _status(p.pid)
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], hwm)
            done.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return Run(label, p.returncode, wall, peak[0], peak[1], cpu=cpu, out=out, err=err)


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def table(rows: list[list[str]], head: list[str]) -> str:
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * x for x in w), *map(line, rows)])


PY = sys.executable
