"""Benchmark (issue #17): a Flux.1-dev-shaped single file (12B parameters, ~24 GB bf16) merged with a kohya LoRA,
side by side with a plain copy of the same bytes, in one run, with the peak memory of each.

Goal: peak anon memory < 2 GB and wall time <= 1.5x the copy on the 24 GiB development machine.

Made by the bench (fake weights, real layout): a BFL-named bf16 single file — 19 double blocks, 38 single
blocks, hidden 3072, MLP 12288, the tensor names and shapes of black-forest-labs' flux1-dev.safetensors
(what diffusers' single-file converter and loraport/names/dit_flux.py read) — written tensor by tensor with
loraport's streaming writer (never held in memory), values drawn from a pool of finite random bf16; and a kohya
(sd-scripts) Flux LoRA, rank --rank (default 32) on every double/single block linear, the fused qkv / linear1
included, bf16 factors with an `alpha` per module as sd-scripts saves them.

Rows, each its own child process (bench/common.py: wall time, peak RssAnon and VmHWM sampled every 10 ms):
       copy      shutil.copyfile of the base + fsync (what reading and writing the bytes costs)
       loraport  `loraport merge --base flux.safetensors --adapter lora.safetensors --out merged.safetensors`
                 (default flags: the integrity manifest on, so the inputs are hashed too — every time: the
                 hash cache is off, as on a first merge of this base)
       loraport-nomanifest   the same with --no-manifest (no sha256 of the 24 GB input and output)
The base is larger than the page cache can hold on this machine, so every row starts cold: before each row
the previous output is deleted and synced and the base and LoRA are evicted from the page cache
(posix_fadvise DONTNEED: only these files, other users' cache is left alone). After the merge row a few merged
tensors are checked against W + alpha/r * up @ down computed here from the two files.

    python bench/flux_scale_bench.py --scale 0.1          # ~2.4 GB, 2 double + 4 single blocks: minutes
    python bench/flux_scale_bench.py --tmp /big/disk      # the full 12B (needs ~50 GB free there)
    python bench/flux_scale_bench.py --keep DIR           # reuse / keep the generated inputs in DIR
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PY, drop_written, gib, run_child, table  # noqa: E402

HIDDEN, MLP, HEAD_DIM = 3072, 12288, 128
DOUBLE, SINGLE = 19, 38
IN_CH, CTX, POOLED, TIME = 64, 4096, 768, 256

# the linears a kohya Flux LoRA trains (sd-scripts networks/lora_flux.py, train_blocks=all): BFL module, (out, in)
DOUBLE_LINEARS = {f"{s}_{m}": shp for s in ("img", "txt") for m, shp in (
    ("attn.qkv", (3 * HIDDEN, HIDDEN)), ("attn.proj", (HIDDEN, HIDDEN)), ("mlp.0", (MLP, HIDDEN)),
    ("mlp.2", (HIDDEN, MLP)), ("mod.lin", (6 * HIDDEN, HIDDEN)))}
SINGLE_LINEARS = {"linear1": (3 * HIDDEN + MLP, HIDDEN), "linear2": (HIDDEN, HIDDEN + MLP),
                  "modulation.lin": (3 * HIDDEN, HIDDEN)}


def blocks(scale: float) -> tuple[int, int]:
    return max(1, round(DOUBLE * scale)), max(1, round(SINGLE * scale))


def flux_shapes(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a BFL Flux.1-dev checkpoint, in the file's (sorted) order."""
    n_double, n_single = blocks(scale)
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, o: int, i: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i), (o,)

    for a, b in (("img_in", IN_CH), ("txt_in", CTX)):
        linear(a, HIDDEN, b)
    for emb, first in (("time_in", TIME), ("vector_in", POOLED), ("guidance_in", TIME)):
        linear(f"{emb}.in_layer", HIDDEN, first)
        linear(f"{emb}.out_layer", HIDDEN, HIDDEN)
    for i in range(n_double):
        for mod, (o, k) in DOUBLE_LINEARS.items():
            linear(f"double_blocks.{i}.{mod}", o, k)
        for side in ("img", "txt"):
            for q in ("query", "key"):
                out[f"double_blocks.{i}.{side}_attn.norm.{q}_norm.scale"] = (HEAD_DIM,)
    for s in range(n_single):
        for mod, (o, k) in SINGLE_LINEARS.items():
            linear(f"single_blocks.{s}.{mod}", o, k)
        for q in ("query", "key"):
            out[f"single_blocks.{s}.norm.{q}_norm.scale"] = (HEAD_DIM,)
    linear("final_layer.linear", IN_CH, HIDDEN)
    linear("final_layer.adaLN_modulation.1", 2 * HIDDEN, HIDDEN)
    return sorted(out.items())


def lora_modules(scale: float = 1.0) -> dict[str, tuple[str, tuple[int, int]]]:
    """kohya module name -> (BFL weight name, (out, in)) for every block linear."""
    n_double, n_single = blocks(scale)
    mods = {}
    for i in range(n_double):
        for mod, shp in DOUBLE_LINEARS.items():
            mods[f"lora_unet_double_blocks_{i}_{mod.replace('.', '_')}"] = (f"double_blocks.{i}.{mod}.weight", shp)
    for s in range(n_single):
        for mod, shp in SINGLE_LINEARS.items():
            mods[f"lora_unet_single_blocks_{s}_{mod.replace('.', '_')}"] = (f"single_blocks.{s}.{mod}.weight", shp)
    return mods


class BF16Pool:
    """N(0, 0.02) values as bf16, generated once; a tensor is a slice at a random offset (tiled when larger):
    finite, varied bytes at disk speed rather than randn speed."""

    def __init__(self, seed: int, n: int = 1 << 25):
        import torch

        self.g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(n, generator=self.g) * 0.02).to(torch.bfloat16)

    def take(self, shape: tuple[int, ...]):
        import torch

        n, size = math.prod(shape), self.pool.numel()
        off = int(torch.randint(0, size, (1,), generator=self.g))
        if n <= size - off:
            return self.pool[off:off + n].view(shape)
        return self.pool.repeat(-(-(n + off) // size))[off:off + n].view(shape)


def build_base(path: Path, scale: float, seed: int = 0) -> int:
    """Write the bf16 Flux single file tensor by tensor (one tensor in memory at a time). Returns its bytes."""
    import torch

    from loraport.safetensors_io import StreamingWriter

    pool = BF16Pool(seed)
    shapes = flux_shapes(scale)
    w = StreamingWriter(path, [(n, torch.bfloat16, s) for n, s in shapes], direct=True)
    for name, shape in shapes:
        t = torch.ones(shape, dtype=torch.bfloat16) if name.endswith(".scale") else pool.take(shape)
        w.write(name, t)
    w.close()
    return path.stat().st_size


def build_lora(path: Path, scale: float, rank: int, seed: int = 1) -> int:
    """A kohya Flux LoRA: lora_down (r, in), lora_up (out, r) in bf16 and alpha = r/2, every block linear."""
    import torch

    from loraport.safetensors_io import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (_, (o, i)) in lora_modules(scale).items():
        sd[f"{mod}.lora_down.weight"] = (torch.randn(rank, i, generator=g) / math.sqrt(i)).to(torch.bfloat16)
        sd[f"{mod}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.01).to(torch.bfloat16)
        sd[f"{mod}.alpha"] = torch.tensor(rank / 2, dtype=torch.bfloat16)
    save_file(sd, path, {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank),
                         "ss_network_alpha": str(rank / 2), "ss_base_model_version": "flux1"})
    return path.stat().st_size


def evict(*paths: Path) -> None:
    """Drop these files' pages from the page cache (written data is synced first), so the next row reads cold."""
    os.sync()
    for p in paths:
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def child_copy(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def child(kind: str, *argv: str) -> None:
    """A row's process; on exit it prints its storage I/O (/proc/self/io read_bytes, write_bytes: what reached
    the disk, page-cache hits excluded) so a row that reads its input twice shows it."""
    try:
        if kind == "copy":
            child_copy(*argv)
        else:
            # a first merge of this base: its sha256 is computed, not taken from an earlier run's hash cache
            os.environ["LORAPORT_NO_HASH_CACHE"] = "1"
            from loraport.cli import main as cli

            cli(list(argv), prog_name="loraport")
    finally:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        print(f"IO {int(io['read_bytes'])} {int(io['write_bytes'])}", file=sys.stderr)


def io_of(err: str) -> tuple[int, int]:
    got = [line.split()[1:] for line in err.splitlines() if line.startswith("IO ")]
    return (int(got[-1][0]), int(got[-1][1])) if got else (0, 0)


def check(base: Path, lora: Path, out: Path, scale: float) -> float:
    """max |merged - (W + alpha/r * up @ down)| in bf16 steps over the first double and single block's linears
    (reference computed in fp32 from the two files, rounded to bf16 once: loraport's rule)."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(base, "pt") as b, safe_open(lora, "pt") as a, safe_open(out, "pt") as m:
        for mod, (wname, _) in lora_modules(scale).items():
            if "_blocks_0_" not in mod:
                continue
            down, up = a.get_tensor(f"{mod}.lora_down.weight").float(), a.get_tensor(f"{mod}.lora_up.weight").float()
            alpha = float(a.get_tensor(f"{mod}.alpha"))
            w = b.get_tensor(wname).float()
            want = (w + (alpha / down.shape[0]) * (up @ down)).bfloat16().float()
            got = m.get_tensor(wname).float()
            step = want.abs().clamp_min(2 ** -20) * 2 ** -7
            worst = max(worst, float(((got - want).abs() / step).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 19 double / 38 single blocks")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--tmp", default=None, help="work folder parent (default: the system temp dir)")
    ap.add_argument("--keep", default=None, help="folder for the generated base and LoRA, kept (reused if there)")
    ap.add_argument("--rows", default="copy,loraport")
    ap.add_argument("--merge-args", default="", help="extra `loraport merge` arguments, space-separated")
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fluxbench-", dir=a.tmp))
    inputs = Path(a.keep) if a.keep else work
    inputs.mkdir(parents=True, exist_ok=True)
    base, lora = inputs / f"flux-{a.scale:g}.safetensors", inputs / f"flux-{a.scale:g}-kohya-r{a.rank}.safetensors"
    try:
        t0 = time.perf_counter()
        if not base.exists():
            build_base(base, a.scale)
        if not lora.exists():
            build_lora(lora, a.scale, a.rank)
        nbytes = base.stat().st_size
        params = sum(math.prod(s) for _, s in flux_shapes(a.scale))
        print(f"inputs: base {gib(nbytes)} ({params / 1e9:.2f}B params, {blocks(a.scale)} double/single blocks), "
              f"LoRA r={a.rank} {gib(lora.stat().st_size)}, ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        res, out = {}, work / "out.safetensors"
        for i, row in enumerate(filter(None, a.rows.split(","))):
            key = row if row not in res else f"{row} #{i + 1}"  # a row asked for again is a repeat, kept too
            drop_written(out)
            evict(base, lora)
            if row == "copy":
                argv = [PY, __file__, "--child", "copy", str(base), str(out)]
            else:
                extra = {"loraport-nomanifest": ["--no-manifest"]}.get(row, [])
                argv = [PY, __file__, "--child", "loraport", "merge", "--base", str(base), "--adapter", str(lora),
                        "--out", str(out), "--json", *extra, *a.merge_args.split()]
            print(f"{row} ...", file=sys.stderr)
            load0 = os.getloadavg()[0]
            r = run_child(key, argv)
            r.load = (load0 + os.getloadavg()[0]) / 2  # the machine is shared: how busy it was meanwhile
            if r.rc != 0:
                raise SystemExit(f"{row}: exit {r.rc}\n{r.err[-2000:]}")
            res[key] = r
            if row.startswith("loraport") and "steps" not in res:
                res["steps"] = check(base, lora, out, a.scale)
        drop_written(out)
        rows = [[r.label, f"{r.wall:.1f}", f"{nbytes / r.wall / 1e9:.2f}", f"{r.cpu:.1f}", gib(r.anon), gib(r.hwm),
                 *(gib(n) for n in io_of(r.err)), f"{r.load:.1f}"] for k, r in res.items() if k != "steps"]
        print(f"Flux.1-dev-shaped bf16 single file, scale {a.scale:g}: {gib(nbytes)}, {params / 1e9:.2f}B params; "
              f"kohya LoRA r={a.rank} on {len(lora_modules(a.scale))} linears; cold page cache for every row; "
              f"{os.cpu_count()} cores, {gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} RAM")
        print(table(rows, ["row", "wall s", "GB/s", "cpu s", "peak anon", "peak RSS", "disk read",
                           "disk write", "load avg"]))
        copy = None  # each merge row against the copy row run last before it (side by side, similar load)
        for k, r in res.items():
            if k.startswith("copy"):
                copy = r
            elif k.startswith("loraport") and copy is not None:
                goal = " (goal <= 1.5)" if "nomanifest" not in k else ""
                print(f"{k} / {copy.label} wall: {r.wall / copy.wall:.3f}{goal}; peak anon {gib(r.anon)} (goal < 2 GB)")
        if "steps" in res:
            print(f"merged vs reference (W + alpha/r * up @ down, block 0's linears): max {res['steps']:.2f} bf16 "
                  "steps")
        print("load avg: the 1-minute load average of the machine (shared, 2 cores) at the start and end of the row")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
