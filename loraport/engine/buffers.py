"""The stream's plumbing: the stage queues (with a shared stop flag and the first error), the byte budget of
tensors in flight, and the pool of reused host buffers."""

from __future__ import annotations

import math
import mmap
import queue
import threading

import torch

from loraport.safetensors_io import itemsize

FIT = 2  # a reused buffer may be up to this many times larger than asked for (Buffers._fit)
DONE = object()  # end of the stream (or a stop): what `Pipeline.get` returns when there is nothing more


class Pipeline:
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
        return DONE

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.stop.set()


class Budget:
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


class Buffers:
    """Reused host buffers. A fresh large tensor costs one page fault per 4 KiB on first touch (and an munmap
    when freed) — more than the arithmetic done on it; a model has few distinct shapes, so buffers are kept per
    byte size, idle ones only while the pool holds at most `cap` bytes in all (issued + idle).

    Each buffer is an anonymous memory map of its own rather than a block of the C heap: a dropped buffer goes
    back to the system at once, where freed heap blocks of varying sizes fragment the heap and stay resident
    (measured on a 400 MB merge: 57 MiB more peak RSS than the pool itself held)."""

    def __init__(self, cap: int, pin: bool = False):
        self.cap, self.kept, self.pin = cap, 0, pin  # pin: page-locked (CUDA copies into them are plain DMA)
        self.out = 0  # bytes issued and not given back
        self.free: dict[int, list[torch.Tensor]] = {}
        self.issued: dict[int, torch.Tensor] = {}
        self.lock = threading.Lock()

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape) * itemsize(dtype)
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            buf = self._fit(n)
            if buf is None:
                self._trim(n)  # a new buffer: idle ones of other sizes make room for it first
        if buf is None:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=True) if self.pin else _mapped(n)
        with self.lock:
            self.issued[buf.data_ptr()] = buf
            self.out += buf.numel()
        return buf[:n].view(dtype).view(shape)

    def _fit(self, n: int) -> torch.Tensor | None:
        """An idle buffer for n bytes (the lock held): one of that size, else the smallest of at most FIT × n
        bytes. A model's tensors come in a handful of sizes whose buffers together pass the cap (Flux: six fp32
        sizes from 38 to 264 MB); reused by size alone, the largest idle ones were dropped and mapped afresh again
        and again, and first-touch page faults on the new maps took most of the reader's upcast time."""
        sizes = [s for s, lst in self.free.items() if lst and n <= s <= n * FIT]
        if not sizes:
            return None
        s = n if n in sizes else min(sizes)
        self.kept -= s
        return self.free[s].pop()

    def give(self, t: torch.Tensor | None) -> None:
        if t is None or t.device.type != "cpu" or t.numel() == 0:
            return
        with self.lock:
            buf = self.issued.pop(t.data_ptr(), None)
            if buf is None:
                return
            n = buf.numel()
            self.out -= n
            self._trim(n)
            if self.kept + self.out + n <= self.cap:
                self.free.setdefault(n, []).append(buf)
                self.kept += n

    def _trim(self, n: int) -> None:
        """Drop the largest idle buffers until n more bytes fit under the cap (or none is left)."""
        while self.kept + self.out + n > self.cap and self.kept:
            k = max(s for s, lst in self.free.items() if lst)
            self.free[k].pop()
            self.kept -= k


def _mapped(n: int) -> torch.Tensor:
    """n bytes in a private anonymous map of their own, unmapped when the last tensor using them goes."""
    return torch.frombuffer(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=torch.uint8)

