"""The merge's output file: bytes appended front to back into a ring of page-aligned chunks, written by an I/O
thread and hashed by another, so the merge's writer never waits on the disk or on sha256 while a slot is free.

How a chunk reaches the disk is the `mode`:
* "behind" (the default where the system has sync_file_range, i.e. Linux): through the page cache with
  write-behind (loraport/pagecache.py): the kernel starts writing each chunk at once and the oldest chunks are
  dropped from the cache, so the output never fills memory and the disk gets the kernel's deep queues.
* "direct": O_DIRECT, bypassing the cache (the previous default). Measured on this project's 2-core VM on a 12B
  Flux merge (bench/results/flux-scale-2026-12-05.txt): the I/O thread spent 75 of 84 s inside pwrite, at
  0.3 GB/s while the reader competed for the disk; with write-behind the same merge ran 67 s (--no-manifest:
  51.6 s → 39.2 s with the reader's drop-behind as well).
* LORAPORT_WRITE_MODE=direct|behind|cache chooses (cache: the StreamingWriter's plain page-cache writer).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from pathlib import Path

from loraport import pagecache

_WAIT = object()  # ChunkSink's I/O thread: no job taken yet


class ChunkSink:
    """A file written front to back in page-aligned chunks, with write-behind or O_DIRECT (`mode`, see above).

    How: bytes are appended (copied) into CHUNK-sized page-aligned buffers; a full buffer goes to an I/O thread
    (`pwrite`, GIL released) and, when hashing, to a hash thread, in order; it is reused once both are done, so
    at most NBUF buffers exist. The buffers are the slots of one ring, so chunks waiting for the disk in
    consecutive slots go out as one larger `pwrite` (up to NBUF × CHUNK): a virtual disk takes few, large
    O_DIRECT requests much faster than one 4 MiB request at a time (measured with dd oflag=direct on this
    project's VM: 4 MiB 166-267 MB/s, 16 MiB 348-369 MB/s), and the ring holds no more memory than before.
    With O_DIRECT the last partial chunk is padded to the alignment, written, and the file is truncated to its
    size; a filesystem that refuses O_DIRECT (EINVAL at open or at the first write) gets the same chunks
    through the page cache instead. Write errors (ENOSPC, EIO) are raised by the next append or by
    `close()`, as OSError with their errno."""

    # 4 × 4 MiB resident per open file: 16 MiB chunks held 64 MiB for the same CPU time (measured writing 400 MB
    # with hashing: user+sys 0.37-0.50 s with 16 MiB chunks, 0.35-0.39 s with 4 MiB)
    CHUNK = 4 << 20
    NBUF = 4
    ALIGN = 4096

    def __init__(self, path: Path, hash: bool, mode: str = "direct"):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = mode == "direct"
        self._behind: pagecache.WriteBehind | None = None
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.fd, self.direct = os.open(path, flags, 0o644), False
        else:
            self.fd = os.open(path, flags, 0o644)
            self._behind = pagecache.WriteBehind(self.fd)
        self.size = 0  # bytes appended
        self._ring = mmap.mmap(-1, self.CHUNK * self.NBUF)  # anonymous maps are page-aligned
        self._free: queue.Queue = queue.Queue()
        for i in range(self.NBUF):
            self._free.put(i)  # a buffer is a slot of the ring, by index
        self._cur: int | None = None
        self._fill = 0
        self._chunk_off = 0  # file offset of the chunk being filled
        self._error: BaseException | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # slot -> users left (the I/O thread, the hash thread)
        self._io_q: queue.SimpleQueue = queue.SimpleQueue()
        self._hash_q: queue.SimpleQueue | None = queue.SimpleQueue() if hash else None
        self._h = hashlib.sha256() if hash else None
        self._threads = [threading.Thread(target=self._io_run, daemon=True)]
        if hash:
            self._threads.append(threading.Thread(target=self._hash_run, daemon=True))
        for t in self._threads:
            t.start()

    def _slot(self, i: int, n: int | None = None) -> memoryview:
        """Slot i of the ring (its first n bytes), or from slot i on when n is larger than one slot."""
        b = i * self.CHUNK
        return memoryview(self._ring)[b : b + (self.CHUNK if n is None else n)]

    # -- producer side (one thread)
    def _take(self) -> int:
        while True:
            if self._error is not None:
                raise self._error
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                continue

    def _room(self, want: int) -> memoryview:
        """Where the next (at most `want`) bytes go: the free part of the current chunk."""
        if self._cur is None:
            self._cur, self._fill = self._take(), 0
        return self._slot(self._cur)[self._fill : self._fill + min(want, self.CHUNK - self._fill)]

    def _filled(self, k: int) -> None:
        self._fill += k
        self.size += k
        if self._fill == self.CHUNK:
            self._submit()

    def append(self, data) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        while done < mv.nbytes:
            room = self._room(mv.nbytes - done)
            room[:] = mv[done : done + len(room)]
            done += len(room)
            self._filled(len(room))

    def append_from(self, fd: int, offset: int, n: int) -> None:
        """Append n bytes of file fd at offset, read straight into the chunk buffers (no intermediate copy)."""
        done = 0
        while done < n:
            got = os.preadv(fd, [self._room(n - done)], offset + done)
            if got <= 0:
                raise OSError(f"input ended while copying ({done} of {n} bytes)")
            done += got
            self._filled(got)

    def _submit(self) -> None:
        buf, length, off = self._cur, self._fill, self._chunk_off
        self._cur, self._fill = None, 0
        self._chunk_off += length  # every chunk but the last is full, so each starts CHUNK-aligned
        with self._lock:
            self._pending[buf] = 2 if self._hash_q is not None else 1
        self._io_q.put((buf, length, off))
        if self._hash_q is not None:
            self._hash_q.put((buf, length))

    def _release(self, buf: int) -> None:
        with self._lock:
            self._pending[buf] -= 1
            last = self._pending[buf] == 0
            if last:
                del self._pending[buf]
        if last:
            self._free.put(buf)

    # -- workers
    def _io_run(self) -> None:
        job = self._io_q.get()
        while job is not None:
            batch, job = [job], _WAIT
            # the full chunks queued right behind this one, in the ring's next slots: the same write
            while batch[-1][1] == self.CHUNK and batch[-1][0] + 1 < self.NBUF:
                try:
                    job = self._io_q.get_nowait()
                except queue.Empty:
                    job = _WAIT
                    break
                if job is None or job[0] != batch[-1][0] + 1:
                    break
                batch.append(job)
                job = _WAIT
            try:
                if self._error is None:
                    self._pwrite(batch[0][0], (len(batch) - 1) * self.CHUNK + batch[-1][1], batch[0][2])
            except BaseException as e:  # noqa: BLE001 - raised to the producer by _take / close
                self._error = e
            for buf, _, _ in batch:
                self._release(buf)
            if job is _WAIT:
                job = self._io_q.get()

    def _pwrite(self, buf: int, length: int, off: int) -> None:
        """Write `length` bytes of the ring from slot `buf` on (whole slots, then the last one's fill)."""
        n = length
        if self.direct and length % self.ALIGN:
            n = -(-length // self.ALIGN) * self.ALIGN  # the last chunk: zero padding, cut off by ftruncate
            self._slot(buf, n)[length:n] = bytes(n - length)
        view = self._slot(buf, n)
        done = 0
        while done < n:
            try:
                k = os.pwrite(self.fd, view[done:n], off + done)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct or done:
                    raise
                import fcntl  # this filesystem takes O_DIRECT at open but not at write: use the page cache

                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                n = length
                continue
            if k <= 0:
                raise OSError(errno.EIO, "short write", None)
            done += k
        if self._behind is not None:
            self._behind.wrote(off, n)

    def _hash_run(self) -> None:
        while (job := self._hash_q.get()) is not None:
            buf, length = job
            try:
                if self._error is None:
                    self._h.update(self._slot(buf, length))
            except BaseException as e:  # noqa: BLE001
                self._error = e
            self._release(buf)

    def _stop(self) -> None:
        if self._stopped:  # close() failed, then abort()
            return
        self._stopped = True
        self._io_q.put(None)
        if self._hash_q is not None:
            self._hash_q.put(None)
        for t in self._threads:
            t.join()
        self._cur = None
        try:  # the ring goes now, not when the writer object does (a merge keeps its writers)
            self._ring.close()
        except BufferError:  # a view of it is still alive (an exception's frame): freed with that view
            pass

    def close(self) -> str | None:
        """Write what is left, cut the padding, fsync; the sha256 (hex) of the file when hashing."""
        try:
            if self._error is None and self._cur is not None and self._fill:
                self._submit()
            self._stop()
            if self._error is not None:
                raise self._error
            if os.fstat(self.fd).st_size != self.size:
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        finally:
            self._close_fd()
        return self._h.hexdigest() if self._h is not None else None

    def abort(self) -> None:
        self._error = self._error or OSError(errno.ECANCELED, "aborted")
        self._stop()
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def write_mode() -> str:
    """How the merge's outputs reach the disk: LORAPORT_WRITE_MODE (behind, direct, cache), else write-behind
    where the system has it, O_DIRECT where it has that, the plain page cache otherwise."""
    asked = os.environ.get("LORAPORT_WRITE_MODE", "").strip().lower()
    if asked in ("behind", "direct", "cache"):
        if asked == "behind" and not pagecache.write_behind() or asked == "direct" and not hasattr(os, "O_DIRECT"):
            return "cache"
        return asked
    if pagecache.write_behind():
        return "behind"
    return "direct" if hasattr(os, "O_DIRECT") else "cache"
