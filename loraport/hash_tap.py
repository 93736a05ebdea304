"""The base's sha256 from the bytes the merge reads anyway.

The integrity manifest records the sha256 of every input. Hashed on a thread of its own, a base is read twice —
once by that thread, once by the merge's reader — and both reads go through the page cache, which a base larger
than memory turns over while the merge runs. A tap instead hashes the spans the reader has just read, in file
order, reading only what the reader skips (the header, untouched tensors, gaps) itself. The reader may then drop
each part from the page cache (loraport/pagecache.py). Measured on the 12B Flux scale bench
(bench/results/flux-scale-2026-12-05.txt, cold cache, 2 cores): with the manifest on, the merge went from 82.7 s
(1.63x a plain copy) to 47-48 s (1.14-1.17x), write-behind, this tap, drop-behind and the buffer pool's reuse
together.

A tap is handed out by `HashCache.claim` (loraport/manifest.py), which makes anyone else asking for the file's
digest wait for the tap. Spans that arrive out of file order (a layout that reads the file in another order)
end the tap without a digest; so does `close` before `finish`: the file is then hashed whole by whoever asks.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

# bytes read at a time for the parts the reader skips, into one buffer per reading thread (not per tap: a base in 30
# shards has 30 taps; with a 16 MiB buffer each, the peak RSS of tests/test_scale_rss.py grew by 48 MiB for 3)
GAP_BUF = 1 << 20
_local = threading.local()


def _gap_buffer() -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) != GAP_BUF:
        buf = _local.buf = bytearray(GAP_BUF)
    return memoryview(buf)


class HashTap:
    def __init__(self, fd: int, size: int, publish: Callable[[str | None], None]):
        self.fd, self.size, self._publish = fd, size, publish
        self._h = hashlib.sha256()
        self.pos = 0  # bytes hashed, from the start of the file
        self.broken = False
        self._done = False
        self._lock = threading.Lock()

    def feed(self, offset: int, data: memoryview) -> bool:
        """Hash `data`, the bytes the reader just read at `offset` (after whatever lies between). True when they
        were hashed, so nobody needs them in the page cache any more."""
        if self.broken or self._done:
            return False
        if offset < self.pos:  # out of file order: the file is hashed whole later
            self.broken = True
            return False
        self._read_to(offset)
        self._h.update(data)
        self.pos = offset + len(data)
        return True

    def skip_to(self, end: int) -> bool:
        """Hash the file up to `end` from the file itself (a span the reader does not read: an untouched tensor
        the writer copies); True when the file is hashed up to there."""
        if self.broken or self._done:
            return False
        self._read_to(end)
        return self.pos >= end

    def _read_to(self, end: int) -> None:
        if self.pos >= end:
            return
        view = _gap_buffer()
        while self.pos < end:
            n = os.preadv(self.fd, [view[: min(end - self.pos, len(view))]], self.pos)
            if n <= 0:  # the file shrank under us: no digest (whoever asks reads it again and sees)
                self.broken = True
                return
            self._h.update(view[:n])
            self.pos += n

    def finish(self) -> None:
        """Hash the rest of the file and publish the digest (nothing when the tap broke)."""
        with self._lock:
            if self._done:
                return
            try:
                if not self.broken:
                    self._read_to(self.size)
            except OSError:
                self.broken = True
            self._end(None if self.broken else self._h.hexdigest())

    def close(self) -> None:
        """End the tap; without `finish` first, no digest is published."""
        with self._lock:
            if not self._done:
                self._end(None)

    def _end(self, digest: str | None) -> None:
        self._done = True
        self._publish(digest)
