"""Stream: the one pipeline, source → compute → sink. For each base tensor in layout order it is read from the
source (pread into a reused buffer, or a dequantizing view), every delta applied in fp32 on the device (`apply`),
rounded once to the output dtype or handed to a quantizer, checked for NaN/Inf, and given to the sink. Reading,
computing and writing run in three threads connected by small bounded queues, so I/O and math overlap; a byte
budget sized by the largest tensor bounds the tensors in flight and host buffers are reused, so peak memory is
imports + a few of the largest tensors, never the model. Untouched tensors whose dtype does not change are copied
as raw bytes by the sink (by a sink that `converts`, those whose dtype changes too: the ONNX sink converts them
piecewise from their file).

Why pread rather than the memory map: a mapped page read by this process counts in its resident set (VmHWM) until
it is unmapped, and a merge touches every updated tensor's pages; read into a reused buffer, the same bytes cost
one buffer per tensor in flight, whatever the model's size (measured on a 400 MB merge: see
bench/results/merge-rss-before-after-2026-12-05.txt).

Where the base is a plain safetensors file (or folder), the stream tells its `BaseReading` (engine/reading.py)
what it reads, skips and writes: the manifest's sha256 of the base comes from those reads, and a base too big to
stay cached leaves the page cache behind the writer.

The source and the sink are roles (see loraport/engine/__init__.py): the safetensors layouts and
`loraport.engine.sinks.SafetensorsSink` for a merge; the ONNX export's graph source or a foreign model's
initializers, and `loraport.onnx.sink.OnnxDataSink`, for `convert --to onnx` and baking. Each tensor is written in
its layout entry's dtype.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from loraport.engine.apply import merged_tensor
from loraport.engine.buffers import DONE, Budget, Buffers, Pipeline
from loraport.engine.device import CudaStager
from loraport.engine.layout import OutFile, nbytes
from loraport.engine.plan import FLOATS, MergePlan
from loraport.engine.reading import BaseReading
from loraport.engine.sinks import Sink
from loraport.errors import BadInputError
from loraport.finite import check_merged, may_be_nonfinite
from loraport.safetensors_io import itemsize, read_into
from loraport.threads import op_threads

# Bytes of host buffers in flight between the stages (and in the buffer pool, idle ones included): room for
# INFLIGHT_TENSORS of the plan's largest item (one being read, one merged, one written: the stages overlap; an
# item gives its read and fp32 buffers back as soon as it is done with them, so more small ones fit), at most
# INFLIGHT_BYTES (two of the largest Llama-8B matrices, each with its read, fp32 and output buffers: 2 × 448 MiB);
# a larger item still passes, alone. Sized by the largest tensor, never by the model (400 MB Llama: 66 MiB).
INFLIGHT_BYTES = 1 << 30
INFLIGHT_TENSORS = 3


@dataclass
class Item:
    fi: int  # index of the output file in the layout
    name: str
    how: str  # "raw" (copied in the kernel) or "tensor"
    quantized: bool = False  # the quantizer writes this tensor's entries
    dtype: torch.dtype | None = None  # the output dtype (its layout entry's) when not quantized
    cost: int = 0  # bytes charged to the in-flight budget
    view: torch.Tensor | None = None  # the base tensor (a pooled buffer it was read into, or the source's own)
    t: torch.Tensor | None = None  # what the compute stage starts from
    owned: bool = False  # t is a private fp32 buffer that may be merged in place
    upcast: str | None = None  # the compute stage makes t from view ("pooled": view is a pooled read buffer)
    event: object = None  # CUDA: the host→device copy of t
    outs: list | None = None  # tensors to write, in layout order
    pooled: list = field(default_factory=list)  # buffers to hand back to the pool once written


class Stream:
    """Runs a plan through a sink: `Stream(...).run(progress)` → {"bytes", "nonfinite", "hashes"}."""

    def __init__(self, plan: MergePlan, layout: list[OutFile], sink: Sink, dev: torch.device,
                 out_dtype: torch.dtype | None, quantizer, nonfinite: str = "warn", label: str | None = None,
                 reading: BaseReading | None = None):
        self.plan, self.base, self.layout, self.sink = plan, plan.base, layout, sink
        self.reading = reading or BaseReading()  # the base's hash taps and page-cache drop (engine/reading.py)
        self.label = label or ("merge" if quantizer is None else "merge+quantize")
        self.dtypes = _entry_dtypes(layout)
        self.dev, self.cuda = dev, dev.type == "cuda"
        self.out_dtype, self.quantizer, self.nonfinite = out_dtype, quantizer, nonfinite
        self.pipe = Pipeline()
        self.limit = budget_bytes(max((self._cost(self._item(fi, n)) for fi, f in enumerate(layout)
                                       for n in f.sources), default=0))
        self.budget = Budget(self.limit, self.pipe.stop)
        # on CUDA the base is read into, and the merged tensors come back into, these buffers: pinned, the host ↔
        # device copies run at DMA speed (measured on an H200 box: with pageable buffers the CUDA path ran 2.3x
        # slower than 16 CPU cores)
        self.pool = Buffers(self.limit, pin=self.cuda)
        self.stager = CudaStager(dev) if self.cuda else None
        self.flagged: list[str] = []

    # --- what each tensor needs -------------------------------------------------------------------
    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.out_dtype if (self.out_dtype is not None and dtype in FLOATS) else dtype

    def _quantized(self, name: str, shape: tuple[int, ...]) -> bool:
        q = self.quantizer
        return q is not None and q.entries(name, shape, self.base.layer_hint(name)) is not None

    def _cost(self, item: Item) -> int:
        """Bytes of host buffers an item may hold at once: the stored tensor read, its fp32 copy (twice that
        for a quantizer's work) unless it only changes dtype, and the output; 0 for a raw copy (the sink copies
        it in the kernel). Buffers given back early return their bytes to the budget (`_give_back`)."""
        if item.how == "raw":
            return 0
        info = self.base.info(item.name)
        n = info.nbytes // itemsize(info.dtype)
        work = 0 if not item.quantized and item.name not in self.plan.updates else (8 if item.quantized else 4)
        return info.nbytes + n * (work + itemsize(item.dtype or self._out_dtype(info.dtype)))

    def _item(self, fi: int, name: str) -> Item:
        info = self.base.info(name)
        quantized = self._quantized(name, self.plan.shape_of(name))
        dt = self._out_dtype(info.dtype) if quantized else self.dtypes[name]
        if name in self.plan.updates or quantized or (dt != info.dtype and not self.sink.converts):
            return Item(fi, name, "tensor", quantized=quantized, dtype=dt)
        return Item(fi, name, "raw")

    # --- stage 1: read ----------------------------------------------------------------------------
    def _reader(self) -> None:
        try:
            torch.set_num_threads(op_threads())  # this thread only (see loraport/threads.py)
            for fi, f in enumerate(self.layout):
                for name in f.sources:
                    item = self._item(fi, name)
                    if item.how == "tensor" and not self._load(item):
                        return
                    if item.how == "raw" and self.reading.taps:
                        self.reading.skipped(self.base.span(name))
                    if not self.pipe.put(self.pipe.q_loaded, item):
                        return
            self.reading.finish()  # the rest of each tapped file (overlapping the last writes)
            self.pipe.put(self.pipe.q_loaded, DONE)
        except BaseException as e:  # noqa: BLE001 - forwarded to the main thread
            self.pipe.fail(e)

    def _load(self, item: Item) -> bool:
        """Prepare a tensor for the compute stage without allocating: the stored tensor is read into a reused
        buffer; an updated one is upcast from there into a reused fp32 buffer; a tensor that only changes dtype
        is cast into a reused output buffer; on CUDA the read buffer is pinned and copied to the device
        asynchronously while the previous tensor is being computed. False: the stream was stopped."""
        info = self.base.info(item.name)
        shape = tuple(info.shape)
        dt = item.dtype
        item.cost = self._cost(item)
        if not self.budget.acquire(item.cost):
            return False
        if item.quantized and item.name not in self.plan.updates:
            kept = self.quantizer.unchanged(item.name)  # an untouched weight already in the output's layout
            if kept is not None:
                item.outs = kept
                return True
        pooled = self._read(item, info)
        if not item.quantized and item.name not in self.plan.updates:  # no math: cast here, or pass the view
            if dt != info.dtype:
                item.outs = [self.pool.take(dt, shape).copy_(item.view)]
                item.pooled.append(item.outs[0])
                if pooled:
                    self._give_back(item, item.view)
                    item.view = None
            else:
                item.outs = [item.view]
        elif self.cuda:  # the pinned read buffer stays until the item is written (the copy is asynchronous)
            item.t, item.event = self.stager.to_device(item.view, pinned=pooled)
        else:  # the compute stage upcasts it (the reader's own work — read, hash — is the longer chain)
            item.upcast = "pooled" if pooled else "view"
        return True

    def _upcast(self, item: Item) -> None:
        """Upcast the read tensor into a reused fp32 buffer (a quantizer reads the base rows it samples from
        .view). Done by the compute stage: on the 12B Flux bench the reader spent 39 of 42 s reading, hashing and
        upcasting while the compute stage waited 14 s for it."""
        item.t = self._fp32_like(item.view)
        item.owned = True
        if item.upcast == "pooled" and not item.quantized:  # the read buffer is free again (a NaN check re-reads
            self._give_back(item, item.view)  # the base)
            item.view = None
        item.upcast = None

    def _give_back(self, item: Item, buf: torch.Tensor) -> None:
        """Return one of an item's pooled buffers before the item is written, and its bytes to the budget."""
        item.pooled = [b for b in item.pooled if b is not buf]
        self.pool.give(buf)
        n = buf.numel() * buf.element_size()
        item.cost -= n
        self.budget.release(n)

    def _read(self, item: Item, info) -> bool:
        """item.view = the stored tensor, read with pread into a pooled buffer (given back once the item is
        written) when the source has a plain file span: no page of the base is mapped into this process. A
        dequantizing source serves its own tensor. True: the view is a pooled (on CUDA: pinned) buffer."""
        span = self.base.span(item.name)
        if span is None:
            item.view = self.base.get(item.name)
            return False
        fd, offset, n = span
        buf = item.view = self.pool.take(info.dtype, tuple(info.shape))
        item.pooled.append(buf)
        mv = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        if n and read_into(fd, mv, offset) != n:
            raise BadInputError(f"{self.base.where(item.name)}: truncated while reading {item.name}")
        self.reading.read(fd, offset, mv)
        return True

    def _fp32_like(self, view: torch.Tensor) -> torch.Tensor:
        """A reused fp32 copy of `view`, in its memory layout: a source that serves a matrix as the transpose of
        how it is stored (an ONNX initializer feeding x @ W) gets a transposed buffer, so the math runs on the
        same layout as on the stored tensor."""
        if view.dim() == 2 and not view.is_contiguous() and view.t().is_contiguous():
            return self.pool.take(torch.float32, (view.shape[1], view.shape[0])).t().copy_(view)
        return self.pool.take(torch.float32, tuple(view.shape)).copy_(view)

    # --- stage 2: compute -------------------------------------------------------------------------
    def _computer(self) -> None:
        try:
            torch.set_num_threads(op_threads())  # this thread only (see loraport/threads.py)
            while True:
                item = self.pipe.get(self.pipe.q_loaded)
                if item is DONE:
                    self.pipe.put(self.pipe.q_ready, DONE)
                    return
                if item.how == "tensor" and item.outs is None:
                    self._compute(item)
                if not self.pipe.put(self.pipe.q_ready, item):
                    return
        except BaseException as e:  # noqa: BLE001
            self.pipe.fail(e)

    def _compute(self, item: Item) -> None:
        if item.upcast:
            self._upcast(item)
        name, t = item.name, item.t
        if item.event is not None:
            self.stager.ready(t, item.event)
        updated = name in self.plan.updates
        merged = merged_tensor(self.plan, name, self.dev, base_tensor=t, copy=not item.owned) if updated else None
        outs = self._quantize(item, merged) if item.quantized else self._round(item, merged)
        if item.owned:
            self._give_back(item, t)
        item.t = merged = None
        if updated and any(may_be_nonfinite(o) for o in outs):
            base = item.view if item.view is not None else self.base.get(name)  # mapped: released once written
            msg = check_merged(name, base, outs, self.nonfinite)  # raises in "fail" mode
            if msg:
                self.flagged.append(msg)
        item.outs = outs

    def _quantize(self, item: Item, merged: torch.Tensor | None) -> list[torch.Tensor]:
        t = item.t
        w32 = merged if merged is not None else (t if item.owned else t.to(self.dev, torch.float32))
        # the base before the merge, for the quantizer's delta metrics (it upcasts only the rows it samples):
        # on CPU the merge happened in place in the reused buffer, so the checkpoint's own view
        b32 = (t if self.cuda else item.view) if merged is not None else None
        return list(self.quantizer.quantize(item.name, w32, base32=b32).values())

    def _round(self, item: Item, merged: torch.Tensor | None) -> list[torch.Tensor]:
        src = merged if merged is not None else item.t
        dt = item.dtype
        if src.dtype == dt and not self.cuda:
            if item.owned:  # the merged fp32 buffer is the output: it goes back to the pool once written
                item.pooled.append(src)
                item.owned = src is not item.t  # a resized tensor is new: the base's buffer goes back now
            return [src]
        out = self.pool.take(dt, self.plan.shape_of(item.name))
        if self.cuda and src.dtype != dt:
            # round on the device: a host ← device copy that also converts goes through a fresh pageable fp32
            # temporary on the host (measured: the CUDA path 2x slower than the CPU path at 4 GB)
            src = src.to(dt)
        out.copy_(src)  # the single rounding to the output dtype (device → host on CUDA)
        item.pooled.append(out)
        return [out]

    # --- stage 3: write (the calling thread) ------------------------------------------------------
    def run(self, progress=None) -> dict:
        threads = [threading.Thread(target=self._reader, daemon=True),
                   threading.Thread(target=self._computer, daemon=True)]
        for th in threads:
            th.start()
        try:
            with _progress(progress, self.layout, self.label) as advance:
                written, pending = self._drain(advance)
            if pending is not None:
                self._finish(*pending)
            if self.pipe.error:
                raise self.pipe.error
            self.sink.close()
        except BaseException:
            self.pipe.stop.set()
            self.sink.abort()
            raise
        finally:
            self.pipe.stop.set()
            for th in threads:
                th.join(timeout=5)
            self.reading.close()
        return {"bytes": written, "nonfinite": self.flagged, "hashes": self.sink.hashes()}

    def _drain(self, advance) -> tuple[int, tuple | None]:
        """Hand every ready item to the sink, in order. The sink hashes on its own thread: an item's buffers go
        back to the pool (and its base pages are released) once the next item is written — one item of lag —
        or as soon as nothing is ready, so its budget lets the reader go on (never wait while holding it)."""
        written, pending = 0, None
        while True:
            item = None
            if pending is not None:
                try:
                    item = self.pipe.q_ready.get_nowait()
                except queue.Empty:
                    self._finish(*pending)
                    pending = None
            if item is None:
                item = self.pipe.get(self.pipe.q_ready)
            if item is DONE or self.pipe.error:
                return written, pending
            if item.how == "raw":
                n, token = self.sink.copy(item.fi, item.name, self.base)
            else:
                n, token = self.sink.write(item.fi, item.name, item.outs)
            if pending is not None:
                self._finish(*pending)
            pending = (token, item)
            written += n
            advance(n, items=1)
            self.sink.close_if_complete(item.fi)

    def _finish(self, token: tuple, item: Item) -> None:
        self.sink.wait(token)
        for t in item.pooled:
            self.pool.give(t)
        item.view = item.outs = None
        item.pooled = []
        self.budget.release(item.cost)
        self.base.release(item.name)
        if self.reading.behind.marks:
            self.reading.consumed(self.base.span(item.name))


class _progress:
    """The stream's progress: `progress(total)` when a caller passed one (the older interface: a context manager
    whose value is `advance(n_bytes)`), else a loraport.progress step (tensors and bytes) that whoever called
    merge() may be watching."""

    def __init__(self, progress, layout: list[OutFile], name: str):
        self.progress, self.layout, self.name = progress, layout, name

    def __enter__(self):
        total = sum(nbytes(e) for f in self.layout for e in f.entries)
        if self.progress is None:
            from loraport.progress import step

            self._cm = step(self.name, total=total, unit="B",
                            items=len({e.name for f in self.layout for e in f.entries}), item_unit="tensors")
            return self._cm.__enter__()
        self._cm = self.progress(total)
        adv = self._cm.__enter__()
        return lambda n=1, items=0: adv(n)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def budget_bytes(largest: int) -> int:
    """The stream's in-flight byte budget for a plan whose largest item holds `largest` bytes of buffers."""
    return max(largest, min(INFLIGHT_BYTES, INFLIGHT_TENSORS * largest))


def _entry_dtypes(layout: list[OutFile]) -> dict[str, torch.dtype]:
    """The output dtype of every tensor written as one layout entry (a quantized one has several: the quantizer
    decides those)."""
    out: dict[str, torch.dtype] = {}
    for f in layout:
        for e in f.entries:
            out[e.name] = e.dtype
    return out


def stream(plan: MergePlan, layout: list[OutFile], sink: Sink, dev: torch.device, out_dtype, quantizer,
           progress=None, nonfinite: str = "warn", label: str | None = None, reading: BaseReading | None = None
           ) -> dict:
    return Stream(plan, layout, sink, dev, out_dtype, quantizer, nonfinite, label, reading).run(progress)

