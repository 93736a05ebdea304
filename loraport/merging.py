"""The merge engine: plan first, then stream.

Plan: every adapter target is resolved to exactly one base tensor (or the saved copies of a tied weight),
its orientation fixed against the base shape, and every failure (unmatched targets, shape mismatches, an
adapter that touches nothing) reported before a byte is written.

Stream: for each base tensor in file order, read it from the memory map, apply every delta in fp32 on the
device (W' = W + Σ wᵢ·ΔWᵢ), round once to the output dtype or hand it to a quantizer, and write it straight
into its output shard, whose header was computed from the plan. Reading, computing and writing run in three
stages connected by small bounded queues, so I/O and math overlap and peak memory is a few tensors.
Untouched tensors whose dtype does not change are copied as raw bytes.
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraport import __version__, paths
from loraport.adapter import Adapter, Delta
from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError, PlanError
from loraport.manifest import sha256_file
from loraport.outputs import check_free_space, check_output, staged_output
from loraport.safetensors_io import StreamingWriter, itemsize
from loraport.threads import cores, op_threads, torch_threads

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
QUANTIZE_CASTS = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def pick_device(spec: str | None = "auto") -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise BadInputError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError("--device cuda asked for, but CUDA is not available here (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise BadInputError(f"unsupported device {spec!r}")
    return dev


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class MergePlan:
    base: Checkpoint
    adapters: list[tuple[Adapter, float]]
    updates: dict[str, list[tuple[Delta, float]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def updated_names(self) -> list[str]:
        return [n for n in self.base.names() if n in self.updates]


def _candidates(target: str) -> list[str]:
    c = [target]
    if target.startswith("model."):
        c.append(target[len("model."):])
    else:
        c.append("model." + target)
    return c


def build_plan(base: Checkpoint, adapters: list[tuple[Adapter, float]], strict: bool = True) -> MergePlan:
    plan = MergePlan(base, adapters)
    for adapter, weight in adapters:
        unmatched, matched = [], 0
        for d in adapter.deltas:
            names: list[str] = []
            for cand in _candidates(d.target):
                names = base.resolve(cand)
                if names:
                    break
            if not names:
                unmatched.append(d.target)
                continue
            for name in names:
                info = base.info(name)
                if d.rows is not None and not (0 <= d.rows[0] < d.rows[1] <= (info.shape[0] if info.shape else 0)):
                    raise PlanError(f"{adapter.path}: rows {d.rows} of {name} are outside its {list(info.shape)}")
                if info.dtype not in FLOATS:
                    raise PlanError(f"{adapter.path}: {name} is {info.dtype}, not a float tensor; cannot update it"
                                    " (a quantized base needs dequantizing first)")
                r = d.resolve(tuple(info.shape), base.layer_hint(name))
                if r.target != name:
                    from dataclasses import replace

                    r = replace(r, target=name)
                plan.updates.setdefault(name, []).append((r, weight))
            matched += 1
        if unmatched:
            shown = ", ".join(unmatched[:8]) + (f" ... (+{len(unmatched) - 8} more)" if len(unmatched) > 8 else "")
            if strict:
                raise PlanError(
                    f"{adapter.path}: {len(unmatched)} of {len(adapter.deltas)} adapter targets have no tensor in "
                    f"the base: {shown} (wrong base model?)"
                ).hint("--no-strict", "merges the rest")
            plan.skipped += unmatched
        if matched == 0:
            raise PlanError(f"{adapter.path}: none of the adapter's {len(adapter.deltas)} targets is in the base "
                            f"(e.g. {adapter.deltas[0].target}); is this the right base model?")
    return plan


def merged_tensor(plan: MergePlan, name: str, device: torch.device | str = "cpu",
                  base_tensor: torch.Tensor | None = None, copy: bool = True) -> torch.Tensor:
    """The merged tensor `name` in fp32 on `device` (the base tensor upcast when nothing updates it).
    copy=False: `base_tensor` is a private fp32 tensor on `device` and is merged in place."""
    device = torch.device(device)
    src = plan.base.get(name) if base_tensor is None else base_tensor
    W = src.to(device=device, dtype=torch.float32, copy=copy or base_tensor is None)
    ups = plan.updates.get(name, ())
    # replacements (modules_to_save, PEFT's saved base_layer) define the base the other deltas apply to
    for d, w in ups:
        if d.replaces_base:
            d.apply_(W, w)
    rest = [(d, w) for d, w in ups if not d.replaces_base]
    ref = W.clone() if len(rest) > 1 and any(d.depends_on_base for d, _ in rest) else None
    plain = [(d, w) for d, w in rest if _plain_lora(d, W)]
    if len(plain) >= FUSE_MIN:  # many adapters: one GEMM over the stacked ranks instead of one pass per adapter
        rest = [(d, w) for d, w in rest if not _plain_lora(d, W)]
        for flag in (False, True):
            group = [(f, w) for d, w in plain if bool((f := d.low_rank_factors()).transpose) == flag]
            if group:
                A = torch.cat([f.A.to(device=W.device, dtype=torch.float32) for f, _ in group])
                B = torch.cat([f.B.to(device=W.device, dtype=torch.float32) * (w * f.scale) for f, w in group], 1)
                if flag:
                    W.addmm_(A.t(), B.t())
                else:
                    W.addmm_(B, A)
    for d, w in rest:
        d.apply_(W, w, base=ref)
    return W


# Plain 2-D LoRA deltas on one tensor from this many adapters are applied as one GEMM over their stacked ranks
# (W += [B₁w₁s₁ … Bₙwₙsₙ]·[A₁; …; Aₙ]): one pass over W instead of n. The sum is rounded in a different order
# than n sequential updates (differences at fp32 rounding level, far below fp16/bf16 output resolution), so
# one or two adapters keep the sequential path, which is bit-identical with applying them one by one.
FUSE_MIN = 3


def _plain_lora(d: Delta, W: torch.Tensor) -> bool:
    return d.plain_lora and d.rows is None and W.dim() == 2


# ------------------------------------------------------------------------------------------------ layout
@dataclass
class OutEntry:
    name: str  # base tensor name (global)
    key: str  # key inside its output file
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class OutFile:
    relpath: str
    entries: list[OutEntry]  # one per written tensor
    sources: list[str]  # base tensor names whose output lands here, in order
    metadata: dict


def _layout(plan: MergePlan, out_dtype: torch.dtype | None, quantizer, shard_size: int | None) -> list[OutFile]:
    base = plan.base
    per_src: dict[str, list[OutEntry]] = {}
    for name in base.names():
        info = base.info(name)
        sh, key = base.shard_of(name)
        prefix = sh.prefix
        ents = None
        if quantizer is not None:
            q = quantizer.entries(name, tuple(info.shape), base.layer_hint(name))
            if q is not None:
                ents = [OutEntry(name, n[len(prefix):] if n.startswith(prefix) else n, dt, tuple(s))
                        for n, dt, s in q]
        if ents is None:
            dt = out_dtype if (out_dtype is not None and info.dtype in FLOATS) else info.dtype
            ents = [OutEntry(name, key, dt, tuple(info.shape))]
        per_src[name] = ents
    files: list[OutFile] = []
    for sh in base.shards:
        meta = dict(sh.file.metadata)
        names = [sh.prefix + k for k in sh.file.names()]
        files.append(OutFile(sh.relpath, [e for n in names for e in per_src[n]], names, meta))
    if shard_size:
        files = _reshard(files, shard_size)
    return files


def _nbytes(e: OutEntry) -> int:
    n = itemsize(e.dtype)
    for s in e.shape:
        n *= s
    return n


def _reshard(files: list[OutFile], limit: int) -> list[OutFile]:
    """Re-split each folder's tensors into shards of at most `limit` bytes, HF-style names."""
    by_dir: dict[str, list[OutFile]] = {}
    for f in files:
        by_dir.setdefault(str(Path(f.relpath).parent), []).append(f)
    out: list[OutFile] = []
    for d, fs in by_dir.items():
        stem = "diffusion_pytorch_model" if any("diffusion_pytorch_model" in f.relpath for f in fs) else "model"
        meta = fs[0].metadata
        groups: list[tuple[list[OutEntry], list[str]]] = [([], [])]
        size = 0
        for f in fs:
            for src in f.sources:
                ents = [e for e in f.entries if e.name == src]
                n = sum(_nbytes(e) for e in ents)
                if groups[-1][0] and size + n > limit:
                    groups.append(([], []))
                    size = 0
                groups[-1][0].extend(ents)
                groups[-1][1].append(src)
                size += n
        total = len(groups)
        for i, (ents, srcs) in enumerate(groups, 1):
            name = f"{stem}.safetensors" if total == 1 else f"{stem}-{i:05d}-of-{total:05d}.safetensors"
            rel = name if d in ("", ".") else f"{d}/{name}"
            out.append(OutFile(rel, ents, srcs, dict(meta)))
    return out


# ------------------------------------------------------------------------------------------------ engine
def _provenance(adapters: list[tuple[Adapter, float]], dtype: str, quantize: str | None,
                hash_of=sha256_file) -> dict:
    return {
        "loraport.version": __version__,
        "loraport.adapters": json.dumps([
            {"path": a.path, "format": a.format, "weight": w,
             "files": {Path(f).name: hash_of(f) for f in a.files if Path(f).is_file()},
             "scale_rules": sorted({d.scale_rule for d in a.deltas})}
            for a, w in adapters
        ]),
        "loraport.dtype": dtype,
        "loraport.quantize": quantize or "none",
    }


_DONE = object()

# Bytes of tensor data in flight between the stages (and kept in the buffer pool): bounds peak memory by size
# rather than by tensor count, and leaves room for two of the largest Llama-8B matrices (fp32 + fp16 copies).
INFLIGHT_BYTES = 768 << 20


@dataclass
class _Item:
    fi: int
    name: str
    how: str  # "raw" (copied in the kernel) or "tensor"
    cost: int = 0  # bytes charged to the in-flight budget
    view: torch.Tensor | None = None  # the base tensor (zero-copy view of the map)
    t: torch.Tensor | None = None  # what the compute stage starts from
    owned: bool = False  # t is a private fp32 buffer that may be merged in place
    event: object = None  # CUDA: the host→device copy of t
    outs: list | None = None  # tensors to write, in layout order
    pooled: list = field(default_factory=list)  # buffers to hand back to the pool once written


class _Pipeline:
    """reader → compute → writer, each in its own thread (torch and file I/O release the GIL)."""

    def __init__(self, depth: int = 3):
        self.q_loaded: queue.Queue = queue.Queue(depth)
        self.q_ready: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _DONE

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.stop.set()


class _Budget:
    """A byte budget for tensors in flight: the reader waits while the stages hold `limit` bytes (a single
    tensor larger than the limit still passes, alone)."""

    def __init__(self, limit: int, stop: threading.Event):
        self.limit, self.used, self.stop = limit, 0, stop
        self.cv = threading.Condition()

    def acquire(self, n: int) -> bool:
        with self.cv:
            while self.used and self.used + n > self.limit:
                if self.stop.is_set():
                    return False
                self.cv.wait(0.1)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cv:
            self.used -= n
            self.cv.notify_all()


class _Buffers:
    """Reused host buffers. A fresh large tensor costs one page fault per 4 KiB on first touch (and an munmap
    when freed) — more than the arithmetic done on it; a model has few distinct shapes, so buffers are kept per
    byte size, at most `cap` bytes of them idle."""

    def __init__(self, cap: int, pin: bool = False):
        self.cap, self.kept, self.pin = cap, 0, pin  # pin: page-locked (CUDA copies into them are plain DMA)
        self.free: dict[int, list[torch.Tensor]] = {}
        self.issued: dict[int, torch.Tensor] = {}
        self.lock = threading.Lock()

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape) * itemsize(dtype)
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            lst = self.free.get(n)
            buf = lst.pop() if lst else None
            if buf is not None:
                self.kept -= n
        if buf is None:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=self.pin)
        with self.lock:
            self.issued[buf.data_ptr()] = buf
        return buf.view(dtype).view(shape)

    def give(self, t: torch.Tensor | None) -> None:
        if t is None or t.device.type != "cpu" or t.numel() == 0:
            return
        with self.lock:
            buf = self.issued.pop(t.data_ptr(), None)
            if buf is None:
                return
            n = buf.numel()
            while self.kept + n > self.cap and self.kept:  # make room: drop the largest idle buffers
                k = max(s for s, lst in self.free.items() if lst)
                self.free[k].pop()
                self.kept -= k
            if self.kept + n <= self.cap:
                self.free.setdefault(n, []).append(buf)
                self.kept += n


class _CudaStager:
    """Host → device copies through two reused pinned buffers on a side stream, so the copy of the next tensor
    runs while the current one is computed. Tensors above `limit` bytes are copied synchronously."""

    def __init__(self, dev: torch.device, limit: int = 256 << 20):
        self.dev, self.limit = dev, limit
        self.stream = torch.cuda.Stream(dev)
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.events: list = [None, None]
        self.i = 0

    def to_device(self, view: torch.Tensor):
        n = view.numel() * view.element_size()
        if n == 0 or n > self.limit:
            return view.to(self.dev), None
        k, self.i = self.i, self.i ^ 1
        if self.events[k] is not None:
            self.events[k].synchronize()  # the previous copy out of this pinned buffer is complete
        buf = self.bufs[k]
        if buf is None or buf.numel() < n:
            buf = self.bufs[k] = torch.empty(-(-n // (1 << 20)) << 20, dtype=torch.uint8, pin_memory=True)
        host = buf[:n].view(view.dtype).view(view.shape)
        host.copy_(view)
        with torch.cuda.stream(self.stream):
            t = host.to(self.dev, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[k] = ev
        return t, ev

    def ready(self, t: torch.Tensor, ev) -> None:
        """Make the compute thread's stream wait for the copy of `t` (and keep t's memory until it is done)."""
        cur = torch.cuda.current_stream(self.dev)
        cur.wait_event(ev)
        t.record_stream(cur)


def _warm_cuda(dev: torch.device) -> None:
    try:
        a = torch.ones(64, 64, device=dev)
        (a @ a).sum().item()
        torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    except Exception:  # noqa: BLE001 - only a warm-up: the merge itself reports any CUDA failure
        pass


def merge(base: str | Path, adapters: list[tuple[str | Path, float]] | list[str | Path], out: str | Path, *,
          dtype: str = "auto", device: str = "auto", shard_size: int | None = None, overwrite: bool = False,
          quantize: str | None = None, quant_options: dict | None = None, strict: bool = True,
          adapter_format: str | None = None, fp16_base: str | Path | None = None, progress=None,
          nonfinite: str = "warn", manifest: bool = True, reference: str | Path | None = None,
          hash_cache=True, allow_incomplete: bool = False) -> dict:
    """Merge adapters into `base` and write the result to `out` (a folder for a folder base, a file for a
    .safetensors base, an .onnx file for an .onnx base: baking). Returns a report dict. See the module docstring
    for how. `reference`: for an ONNX base, the HF folder it was exported from (weights matched by value).
    `hash_cache`: True reuses the inputs' sha256 remembered by earlier runs (loraport.manifest.HashCache), False
    hashes every input again; a HashCache object is used as given (a batch shares one across its merges).
    `allow_incomplete`: write a model folder even when the base lacks what transformers needs to load it."""
    t0 = time.perf_counter()
    adapters = [(a, 1.0) if isinstance(a, (str, Path)) else (a[0], float(a[1])) for a in adapters]
    if not adapters:
        raise BadInputError("no --adapter given")
    base_p = Path(base)
    if base_p.suffix == ".onnx":
        try:
            from loraport.onnx import bake
        except ImportError:
            raise BadInputError("ONNX baking is not available in this installation") from None
        ignored = {"--dtype": dtype != "auto", "--shard-size": shard_size, "--quantize": quantize,
                   "--fp16-base": fp16_base, "--format": adapter_format}
        if any(ignored.values()):  # baking keeps the model's own dtypes and layout and detects adapter formats
            raise BadInputError(f"{', '.join(k for k, v in ignored.items() if v)} do(es) not apply to baking into "
                                "an .onnx --base")
        return bake(str(base_p), [(str(a), w) for a, w in adapters], str(out), overwrite=overwrite, strict=strict,
                    device=device, reference=str(reference) if reference else None, manifest=manifest,
                    hash_cache=hash_cache)
    if reference is not None:
        raise BadInputError("--reference applies to an .onnx --base (baking)")
    out_p = check_output(out, [base, fp16_base, *[a for a, _ in adapters]], overwrite)
    dev = pick_device(device)
    if dev.type == "cuda":  # the CUDA context and cuBLAS start (a second or more) while the adapters are read
        threading.Thread(target=_warm_cuda, args=(dev,), daemon=True).start()
    if dtype not in ("auto", *DTYPES):
        raise BadInputError(f"unknown --dtype {dtype!r} (auto, fp32, fp16, bf16)")
    out_dtype = None if dtype == "auto" else DTYPES[dtype]
    quantizer = None
    if quantize:
        if quantize in QUANTIZE_CASTS:
            out_dtype = DTYPES[quantize]
        else:
            from loraport.quant import get_quantizer

            quantizer = get_quantizer(quantize, **(quant_options or {}))

    ckpt = open_base(base_p, fp16_base=fp16_base, quantize=quantize)
    if not allow_incomplete:
        check_loadable(ckpt)
    from loraport import manifest as mf

    cache = mf.HashCache.of(hash_cache)
    # the inputs' sha256 (most of the manifest's cost) start now, overlapping the adapter reading and planning;
    # the adapters come last: load_one below hashes them as it reads them, and the cache shares those digests
    hashes = mf.BackgroundHashes([base, fp16_base, *[a for a, _ in adapters]], cache) if manifest else None
    if quantizer is not None and hasattr(quantizer, "bind"):
        quantizer.bind(ckpt)  # compute dtype from the base; warns when re-quantizing an already-quantized base
    from loraport.formats import load_adapter

    from loraport.finite import check_adapters, check_mode

    mode = check_mode(nonfinite)

    def load_one(aw: tuple) -> tuple[tuple[Adapter, float], list[str]]:
        with torch_threads(1):  # hundreds of small tensors: one thread each op, no team to wait for
            ad = (load_adapter(aw[0], format=adapter_format, base=ckpt, strict=strict), aw[1])
            warns = check_adapters([ad], mode)  # NaN/Inf in an adapter: warn, or refuse ("fail")
        for f in ad[0].files:  # the provenance's digests (shared with the manifest through the cache)
            if Path(f).is_file():
                cache.sha256(f)
        return ad, warns

    if len(adapters) > 1:  # read, check and hash the adapters side by side (a batch of 8 took 0.4 s one by one)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(adapters), max(2, cores()))) as ex:
            done = list(ex.map(load_one, adapters))  # results (and the first error) in adapter order
    else:
        done = [load_one(adapters[0])]
    loaded = [ad for ad, _ in done]
    warns = [m for _, ms in done for m in ms]
    try:
        plan = build_plan(ckpt, loaded, strict=strict)
    except PlanError as e:  # name the adapter file(s) when the message (e.g. a delta's shape check) does not
        if any(a.path in str(e) for a, _ in loaded):
            raise
        raise PlanError(f"{', '.join(a.path for a, _ in loaded)}: {e}") from None
    single = ckpt.kind == "safetensors-file"
    if single and shard_size:
        raise BadInputError("--shard-size applies to model folders; the base is a single .safetensors file")
    layout = _layout(plan, out_dtype, quantizer, shard_size)
    total = sum(_nbytes(e) for f in layout for e in f.entries)
    check_free_space(out_p.parent, total + sum((ckpt.root / x).stat().st_size for x in ckpt.extra_files))
    prov = _provenance(loaded, dtype, quantize, cache.sha256)
    with staged_output(out_p, is_dir=not single, overwrite=overwrite) as stage:
        stats = _stream(plan, layout, stage, single, dev, out_dtype, quantizer, prov, progress, nonfinite=nonfinite,
                        hash_outputs=hashes is not None)
        if not single:
            _write_side_files(ckpt, layout, stage, out_dtype, quantizer)
        if hashes is not None:  # the manifest describes the staged files, so it is renamed into place with them
            summary = {"base": str(base_p), "dtype": dtype, "quantize": quantize, "strict": strict,
                       "adapters": [{"path": a.path, "format": a.format, "weight": w, "targets": len(a.deltas)}
                                    for a, w in loaded],
                       "tensors": len(ckpt.names()), "tensors_updated": len(plan.updates),
                       "skipped_targets": len(plan.skipped)}
            man = mf.build(stage, inputs=hashes.result(), plan=summary, name=out_p.name, known=stats["hashes"])
            if not single:
                mf.write_into(stage, man)
    if hashes is not None and single:
        mf.write_sibling(out_p, man)
    report = {
        "base": str(base_p), "out": str(out_p), "device": str(dev), "dtype": dtype,
        "quantize": quantize, "adapters": [{"path": a.path, "format": a.format, "weight": w,
                                            "targets": len(a.deltas)} for a, w in loaded],
        "tensors": len(ckpt.names()), "tensors_updated": len(plan.updates), "skipped_targets": plan.skipped,
        "files": [f.relpath for f in layout], "bytes_written": stats["bytes"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    report["warnings"] = warns + stats.get("nonfinite", [])
    if hashes is not None:
        report["manifest"] = str(mf.manifest_path(out_p))
    if quantizer is not None:
        report["quantization"] = quantizer.report()
        # surface the quantizer's warnings (e.g. "re-quantization erased most of the adapter") where CI looks
        report["warnings"] += [r["warning"] for r in report["quantization"] if isinstance(r, dict) and r.get("warning")]
    ckpt.close()
    return report


def open_base(path: Path, fp16_base=None, quantize: str | None = None):
    """The base as a Checkpoint; bitsandbytes-quantized folders are served dequantized by loraport.quant."""
    ckpt = Checkpoint.open(path)
    qc = ckpt.config.get("quantization_config") if isinstance(ckpt.config, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" or fp16_base is not None:
        try:
            from loraport.quant.bnb_checkpoint import open_quantized_base
        except ImportError:
            raise BadInputError(f"{path}: a bitsandbytes-quantized base is not supported by this installation") \
                from None
        return open_quantized_base(ckpt, fp16_base=fp16_base, quantize=quantize)
    if fp16_base is not None:
        raise BadInputError("--fp16-base is only meaningful with a quantized --base")
    return ckpt


def check_loadable(ckpt) -> None:
    """Refuse a model-folder base whose merged copy transformers could not load: without config.json (or with
    one that names no model_type) from_pretrained fails. Diffusers pipelines and single files have their own
    layouts; a diffusers component folder's config names its `_class_name` instead."""
    if getattr(ckpt, "kind", None) != "hf-folder":
        return
    cfg = ckpt.root / "config.json"
    if not cfg.is_file():
        raise BadInputError(f"{ckpt.root}: no config.json, so the merged folder could not be loaded by transformers; "
                            "copy the model's config.json next to its weights, or pass --allow-incomplete to write "
                            "the weights anyway")
    if not isinstance(ckpt.config, dict) or not (ckpt.config.get("model_type") or ckpt.config.get("_class_name")):
        raise BadInputError(f"{cfg}: names no model_type, so the merged folder could not be loaded by transformers; "
                            "use the model's own config.json, or pass --allow-incomplete to write the weights anyway")


def _stream(plan: MergePlan, layout: list[OutFile], stage: Path, single: bool, dev: torch.device,
            out_dtype, quantizer, prov: dict, progress, nonfinite: str = "warn", hash_outputs: bool = False) -> dict:
    base = plan.base
    pipe = _Pipeline()
    order = [(fi, src) for fi, f in enumerate(layout) for src in f.sources]
    cuda = dev.type == "cuda"
    raw_ok = hasattr(base, "raw")
    span_ok = hasattr(base, "span")
    release = getattr(base, "release", None)
    from loraport.finite import check_merged, may_be_nonfinite

    flagged: list[str] = []
    budget = _Budget(INFLIGHT_BYTES, pipe.stop)
    # on CUDA the merged tensors come back into these buffers: pinned, the device → host copy runs at DMA speed
    # (measured on an H200 box: with pageable buffers the CUDA path ran 2.3x slower than the 16-core CPU path)
    pool = _Buffers(INFLIGHT_BYTES, pin=cuda)
    stager = _CudaStager(dev) if cuda else None

    def wants_raw(name: str) -> bool:
        if name in plan.updates or not raw_ok:
            return False
        info = base.info(name)
        if quantizer is not None and quantizer.entries(name, tuple(info.shape), base.layer_hint(name)) is not None:
            return False
        return out_dtype is None or info.dtype not in FLOATS or info.dtype == out_dtype

    def out_dtype_of(info) -> torch.dtype:
        return out_dtype if (out_dtype is not None and info.dtype in FLOATS) else info.dtype

    def reader():
        # Prepares each tensor for the compute stage without allocating: an updated tensor is copied (and
        # upcast) from the memory map straight into a reused fp32 buffer; a tensor that only changes dtype is
        # cast into a reused output buffer; on CUDA it is staged through pinned memory and copied to the
        # device asynchronously while the previous tensor is being computed.
        try:
            torch.set_num_threads(op_threads())  # this thread only (see loraport/threads.py)
            for fi, name in order:
                if wants_raw(name):
                    item = _Item(fi, name, "raw")
                else:
                    info = base.info(name)
                    shape, n = tuple(info.shape), info.nbytes // itemsize(info.dtype)
                    q = quantizer.entries(name, shape, base.layer_hint(name)) if quantizer is not None else None
                    dt = out_dtype_of(info)
                    cost = n * (8 + itemsize(dt)) if q is not None else n * (4 + itemsize(dt))
                    if not budget.acquire(cost):
                        return
                    item = _Item(fi, name, "tensor", cost=cost, view=base.get(name))
                    if q is None and name not in plan.updates:  # no math: cast here, or pass the view through
                        if dt != info.dtype:
                            item.outs = [pool.take(dt, shape).copy_(item.view)]
                            item.pooled = list(item.outs)
                        else:
                            item.outs = [item.view]
                    elif cuda:
                        item.t, item.event = stager.to_device(item.view)
                    else:  # upcast into a reused buffer (a quantizer reads the base rows it samples from .view)
                        item.t = pool.take(torch.float32, shape).copy_(item.view)
                        item.owned = True
                if not pipe.put(pipe.q_loaded, item):
                    return
            pipe.put(pipe.q_loaded, _DONE)
        except BaseException as e:  # noqa: BLE001 - forwarded to the main thread
            pipe.fail(e)

    def compute():
        try:
            torch.set_num_threads(op_threads())  # this thread only (see loraport/threads.py)
            while True:
                item = pipe.get(pipe.q_loaded)
                if item is _DONE:
                    pipe.put(pipe.q_ready, _DONE)
                    return
                if item.how == "tensor" and item.outs is None:
                    _compute(item)
                if not pipe.put(pipe.q_ready, item):
                    return
        except BaseException as e:  # noqa: BLE001
            pipe.fail(e)

    def _compute(item: _Item) -> None:
        name = item.name
        info = base.info(name)
        t = item.t
        if item.event is not None:
            stager.ready(t, item.event)
        merged = None
        if name in plan.updates:
            merged = merged_tensor(plan, name, dev, base_tensor=t, copy=not item.owned)
        q = quantizer.entries(name, tuple(info.shape), base.layer_hint(name)) if quantizer else None
        if q is not None:
            w32 = merged if merged is not None else (t if item.owned else t.to(dev, torch.float32))
            # the base before the merge, for the quantizer's delta metrics (it upcasts only the rows it samples):
            # on CPU the merge happened in place in the reused buffer, so the checkpoint's own view
            b32 = (t if cuda else item.view) if merged is not None else None
            outs = list(quantizer.quantize(name, w32, base32=b32).values())
        else:
            src = merged if merged is not None else t
            dt = out_dtype_of(info)
            if src.dtype == dt and not cuda:
                outs = [src]
                if item.owned:
                    item.pooled.append(src)
                    item.owned = False
            else:
                out = pool.take(dt, tuple(info.shape))
                if cuda and src.dtype != dt:
                    # round on the device: a host ← device copy that also converts goes through a fresh pageable
                    # fp32 temporary on the host (measured: the CUDA path 2x slower than the CPU path at 4 GB)
                    src = src.to(dt)
                out.copy_(src)  # the single rounding to the output dtype (device → host on CUDA)
                outs = [out]
                item.pooled.append(out)
        if item.owned:
            pool.give(t)
        item.t = merged = None
        if name in plan.updates and any(may_be_nonfinite(o) for o in outs):
            msg = check_merged(name, item.view, outs, nonfinite)  # raises in "fail" mode
            if msg:
                flagged.append(msg)
        item.outs = outs

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=compute, daemon=True)]
    for th in threads:
        th.start()
    writers: dict[int, StreamingWriter] = {}
    written = 0
    pending = None  # (writer, last write's sequence number, item) not yet given back

    def finish(w: StreamingWriter, seq: int, item: _Item) -> None:
        w.wait_hashed(seq)
        for t in item.pooled:
            pool.give(t)
        item.view = item.outs = None
        item.pooled = []
        budget.release(item.cost)
        if release is not None:
            release(item.name)

    try:
        with _progress(progress, sum(_nbytes(e) for f in layout for e in f.entries)) as advance:
            while True:
                item = None
                if pending is not None:  # the next item if it is ready; else give the last one back first,
                    try:  # so its budget lets the reader go on (never wait while holding it)
                        item = pipe.q_ready.get_nowait()
                    except queue.Empty:
                        finish(*pending)
                        pending = None
                if item is None:
                    item = pipe.get(pipe.q_ready)
                if item is _DONE or pipe.error:
                    break
                fi, name, outs = item.fi, item.name, item.outs
                f = layout[fi]
                w = writers.get(fi)
                if w is None:
                    path = stage if single else stage / f.relpath
                    path.parent.mkdir(parents=True, exist_ok=True)
                    w = writers[fi] = StreamingWriter(path, [(e.key, e.dtype, e.shape) for e in f.entries],
                                                      {**f.metadata, **prov}, hash=hash_outputs, direct=True)
                ents = [e for e in f.entries if e.name == name]
                if item.how == "raw":
                    span = base.span(name) if span_ok else None
                    if span is not None:
                        w.copy_range(ents[0].key, *span)  # in the kernel, never through Python
                    else:
                        w.write(ents[0].key, base.raw(name))
                    n = _nbytes(ents[0])
                else:
                    if len(outs) != len(ents):
                        raise RuntimeError(f"{name}: {len(outs)} tensors for {len(ents)} entries")
                    n = 0
                    for e, t in zip(ents, outs):
                        if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                            raise RuntimeError(f"{name}: produced {t.dtype} {list(t.shape)}, planned {e.dtype} "
                                               f"{list(e.shape)}")
                        w.write(e.key, t)
                        n += _nbytes(e)
                # the writer hashes on its own thread: this item's buffers go back to the pool (and its base
                # pages are released) once the previous item's bytes are hashed — one item of lag
                if pending is not None:
                    finish(*pending)
                pending = (w, w.last_seq, item)
                written += n
                advance(n)
                if w._i == len(f.entries):
                    w.close()
        if pending is not None:
            finish(*pending)
            pending = None
        if pipe.error:
            raise pipe.error
        for fi, f in enumerate(layout):
            if fi not in writers:  # a file with no tensors
                path = stage if single else stage / f.relpath
                writers[fi] = StreamingWriter(path, [], {**f.metadata, **prov}, hash=hash_outputs)
                writers[fi].close()
    except BaseException:
        pipe.stop.set()
        for w in writers.values():
            w.abort()
        raise
    finally:
        pipe.stop.set()
        for th in threads:
            th.join(timeout=5)
    hashes = {str(w.path): (w.sha256(), w.file_size) for w in writers.values() if w.sha256()}
    return {"bytes": written, "nonfinite": flagged, "hashes": hashes}


class _progress:
    def __init__(self, progress, total):
        self.progress, self.total = progress, total

    def __enter__(self):
        if self.progress is None:
            return lambda n=1: None
        self._cm = self.progress(self.total)
        return self._cm.__enter__()

    def __exit__(self, *exc):
        if self.progress is not None:
            return self._cm.__exit__(*exc)
        return False


def _write_side_files(ckpt: Checkpoint, layout: list[OutFile], stage: Path, out_dtype, quantizer) -> None:
    """Copy every non-weight file; write indexes for multi-file folders; update config.json for the dtype
    and quantization."""
    for rel in ckpt.extra_files:
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(paths.member(ckpt.root, ckpt.root / rel), dst)  # checked again: never copy from outside
    by_dir: dict[str, list[OutFile]] = {}
    for f in layout:
        by_dir.setdefault(str(Path(f.relpath).parent), []).append(f)
    old_index = {str(Path(i).parent): Path(i).name for i in ckpt.index_files}
    for d, fs in by_dir.items():
        if len(fs) == 1 and d not in old_index:
            continue
        stem = Path(fs[0].relpath).name.split("-0")[0].removesuffix(".safetensors")
        name = old_index.get(d, f"{stem}.safetensors.index.json")
        wm = {e.key: Path(f.relpath).name for f in fs for e in f.entries}
        idx = {"metadata": {"total_size": sum(_nbytes(e) for f in fs for e in f.entries)}, "weight_map": wm}
        dst = stage / (name if d in ("", ".") else f"{d}/{name}")
        dst.write_text(json.dumps(idx, indent=2) + "\n", encoding="utf-8")
    cfg_path = stage / "config.json"
    rewritten = getattr(ckpt, "config_rewritten", False)  # e.g. a dequantized base drops quantization_config
    if cfg_path.is_file() and (out_dtype is not None or quantizer is not None or rewritten):
        if rewritten:
            cfg = dict(ckpt.config)
        else:
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                return
        if out_dtype is not None:
            name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[out_dtype]
            for k in ("torch_dtype", "dtype"):
                if k in cfg or k == "torch_dtype":
                    cfg[k] = name
        if quantizer is not None:
            cfg = quantizer.config_update(cfg)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
