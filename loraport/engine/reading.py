"""Reading a plain safetensors base, besides its bytes: the manifest's sha256 of each file taken from the spans the
stream reads (loraport/hash_tap.py: no second reader), and, for a base too big to stay cached, each part dropped
from the page cache once it is read, hashed and written (loraport/pagecache.py).

The stream tells a `BaseReading` what it does — `read` (a span it read), `skipped` (an untouched span the sink
copies), `consumed` (a tensor written) — and calls `finish` when the reader is done, `close` in any case.
`base_reading(ckpt, cache)` makes one for a merge.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from loraport import pagecache
from loraport.checkpoint import Checkpoint


class BaseReading:
    def __init__(self, taps: dict | None = None, drop: frozenset[int] = frozenset()):
        self.taps = taps or {}  # file descriptor -> loraport.hash_tap.HashTap
        self.behind = pagecache.DropBehind(drop)  # the descriptors whose consumed parts leave the page cache

    def read(self, fd: int, offset: int, data: memoryview) -> None:
        """The reader read `data` at `offset` of `fd`."""
        tap = self.taps.get(fd)
        if tap is not None:
            tap.feed(offset, data)

    def skipped(self, span: tuple[int, int, int] | None) -> None:
        """The reader passed an untouched tensor (fd, offset, n) that the sink copies: hashed here, in file order
        (read into the page cache, where the sink's copy finds it)."""
        tap = self.taps.get(span[0]) if span is not None else None
        if tap is not None:
            tap.skip_to(span[1] + span[2])

    def consumed(self, span: tuple[int, int, int] | None) -> None:
        """A tensor (fd, offset, n) is written: the base before its end is read, copied and hashed (items come in
        file order; the reader and its tap run ahead of the writer), so it may leave the page cache — unless the
        tap broke (the file is then hashed whole, from the cache)."""
        if span is None or span[0] not in self.behind.marks:
            return
        fd, offset, n = span
        tap = self.taps.get(fd)
        if tap is None or not tap.broken and tap.pos >= offset + n:
            self.behind.consumed(fd, offset + n)

    def finish(self) -> None:
        """The reader is done: each tap hashes the rest of its file and publishes the digest."""
        for tap in self.taps.values():
            tap.finish()

    def close(self) -> None:
        """A tap not finished (an error) publishes nothing, so whoever waits hashes the file whole."""
        for tap in self.taps.values():
            tap.close()


@contextmanager
def base_reading(ckpt: Checkpoint, cache) -> Iterator[BaseReading]:
    """The BaseReading of a merge from `ckpt` with the run's HashCache `cache` (None: no manifest, nothing to
    hash). Only a plain safetensors base (a layered source serves its own, dequantized tensors). Its files are
    dropped behind the stream when the base is too big to stay cached and nobody else still reads them for a
    digest (tapped here, already known, or no manifest)."""
    reading = BaseReading()
    try:
        if type(ckpt) is Checkpoint:
            files = [sh.file for sh in ckpt.shards]
            big = pagecache.worth_dropping(sum(f.path.stat().st_size for f in files))
            drop = set()
            for f in files:
                fd = f.fileno()
                tap = cache.claim(f.path, fd) if cache is not None else None
                if tap is not None:
                    reading.taps[fd] = tap
                if big and (cache is None or tap is not None or cache.known(f.path) is not None):
                    drop.add(fd)
            reading.behind = pagecache.DropBehind(drop)
        yield reading
    finally:
        reading.close()
