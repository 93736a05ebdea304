"""Safetensors read and write, streaming and validated.

Reading: the header is checked before anything is allocated from it (length within the file, valid JSON,
known dtypes, shapes and offsets that fit the file and do not overlap), then tensors are served as zero-copy
views of a read-only memory map. Writing: `StreamingWriter` takes the full list of (name, dtype, shape) up
front — the plan knows it — writes the header, then accepts tensors one by one in that order, so a shard is
never held in memory.

Layout (little-endian): u64 header length N · N bytes of JSON {name: {dtype, shape, data_offsets:[b,e]},
"__metadata__": {str: str}} padded with spaces · data, offsets relative to the end of the header.

Size: reader and streaming writer are mirror images of one file layout and share its checks (the merge's chunked
output sink lives in loraport/chunk_sink.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import queue
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from loraport.chunk_sink import ChunkSink, write_mode
from loraport.errors import BadInputError
from loraport.paths import regular

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
MAX_ENTRIES = 1 << 17  # tensors per file (the largest real shards hold thousands); more is a header bomb

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE.get(dtype) or torch.empty((), dtype=dtype).element_size()


_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in DTYPES.values()}


_BAD_NAME = re.compile(r"[\x00-\x1f]")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. Tensors come back as read-only zero-copy views
    (clone before modifying)."""

    def __init__(self, path: str | Path):
        self.path = regular(path)  # never a FIFO or /proc file: opening or reading one may never end
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise BadInputError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or n + 8 > size:
                    raise BadInputError(
                        f"{self.path}: corrupted safetensors header (header length {n} exceeds the file "
                        f"size {size}); the file is truncated or not safetensors"
                    )
                raw = f.read(n)
        except OSError as e:
            raise BadInputError(f"{self.path}: cannot read ({e.strerror or e})") from None
        entries = raw.count(b"data_offsets")  # counted before parsing: a parse of a huge table costs GBs
        if entries > MAX_ENTRIES:
            raise BadInputError(f"{self.path}: safetensors header lists {entries} tensors (at most {MAX_ENTRIES}); "
                                "refused")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise BadInputError(f"{self.path}: corrupted safetensors header ({str(e)[:120]})") from None
        except RecursionError:  # "[[[[...": nesting deeper than the JSON decoder's stack
            raise BadInputError(f"{self.path}: corrupted safetensors header (JSON nested too deeply)") from None
        if not isinstance(header, dict):
            raise BadInputError(f"{self.path}: corrupted safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise BadInputError(f"{self.path}: safetensors __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, ent in header.items():
            self.tensors[name] = info = _check_entry(self.path, name, ent, self.data_start, data_len)
            spans.append((info.begin, info.end, name))
        spans.sort()
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise BadInputError(f"{self.path}: tensors {n0!r} and {n1!r} overlap in the data section")
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._size = size

    # ordered as in the data section, which is how writers (and our streaming writer) lay them out
    def names(self) -> list[str]:
        return [t.name for t in sorted(self.tensors.values(), key=lambda t: t.begin)]

    def _map(self) -> mmap.mmap | None:
        if self._mm is None and self._size > 0:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def raw(self, name: str) -> memoryview:
        info = self.tensors[name]
        mm = self._map()
        if info.nbytes == 0:
            return memoryview(b"")
        return memoryview(mm)[info.begin : info.end]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise BadInputError(f"{self.path}: no tensor named {name!r}")
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: we never write through it
            t = torch.frombuffer(self.raw(name), dtype=info.dtype)
        return t.reshape(info.shape)

    def span(self, name: str) -> tuple[int, int, int]:
        """(file descriptor, absolute offset, byte count) of a tensor's stored bytes, for copying them with
        os.copy_file_range / sendfile without mapping them into this process."""
        info = self.tensors[name]
        return self.fileno(), info.begin, info.nbytes

    def fileno(self) -> int:
        """The file's descriptor for pread (opened on first use, closed by `close`)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            try:  # tensors are streamed in file order: ask the kernel for aggressive readahead
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):
                pass
        return self._fd

    def release(self, name: str) -> None:
        """Unmap the pages of a tensor that has been consumed (they stay in the page cache), so the resident
        set of a streaming pass does not grow with the file. Views of it stay valid (pages fault back in)."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        info = self.tensors[name]
        page = mmap.PAGESIZE
        b = -(-info.begin // page) * page  # whole pages inside the tensor only: neighbours may still be in use
        e = info.end // page * page
        if e > b:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, b, e - b)
            except (OSError, ValueError):
                pass

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, copied out of the map (for small files: adapters)."""
        return {n: self.get(n).clone() for n in self.names()}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the map closes when they go
                pass
            self._mm = None


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):  # rare: find the culprit
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return d


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")  # lone surrogates ("\\ud800" in the JSON) decode but cannot be written back
    except UnicodeEncodeError:
        return False
    return True


def _check_entry(path: Path, name: str, ent, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name[:80]!r}"
    if not name or _BAD_NAME.search(name) or len(name) > 1024 or not _utf8(name):
        raise BadInputError(f"{path}: invalid tensor name {name[:80]!r}")
    if not isinstance(ent, dict):
        raise BadInputError(f"{where}: header entry is not an object")
    dt = ent.get("dtype")
    if not isinstance(dt, str) or dt not in DTYPES:
        raise BadInputError(f"{where}: unknown dtype {str(dt)[:20]!r}")
    shape = ent.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**48 for s in shape
    ):
        raise BadInputError(f"{where}: invalid shape {str(shape)[:60]}")
    offs = ent.get("data_offsets")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                for o in offs)):
        raise BadInputError(f"{where}: invalid data_offsets")
    b, e = offs
    if not 0 <= b <= e <= data_len:
        raise BadInputError(f"{where}: data offsets {offs} outside the file's data section ({data_len} bytes)")
    dtype = DTYPES[dt]
    if math.prod(shape) * itemsize(dtype) != e - b:
        raise BadInputError(f"{where}: {e - b} bytes do not hold shape {shape} of {dt}")
    return TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + e)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor without a copy when it is contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class StreamingWriter:
    """Write one safetensors file whose header is known in advance; tensors arrive in order, one at a time.

    With `hash=True` the file's sha256 is computed from the bytes as they are written (the file is written
    strictly in order), so an integrity manifest does not have to read the output back: `sha256()` after
    `close()`. The hashing runs on a thread of its own (hashlib releases the GIL), in write order; after each
    write `last_seq` numbers it, and the caller keeps a written buffer unchanged until `wait_hashed(seq)`.

    `direct=True` (the merge engine's outputs): the bytes go through `loraport.chunk_sink.ChunkSink` — copied
    into page-aligned chunks written with write-behind (or O_DIRECT) and hashed from those chunks — so a written
    buffer is free as soon as `write` returns (`wait_hashed` is then a no-op). LORAPORT_WRITE_MODE=cache turns
    it off (the plain page cache is used)."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, hash: bool = False, direct: bool = False):
        self.path = Path(path)
        self._h: _Hasher | None = None
        self._sink: ChunkSink | None = None
        self._digest: str | None = None
        self.last_seq = 0
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        self.order: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            if name in header:
                raise BadInputError(f"duplicate output tensor {name!r}")
            n = math.prod(shape) * itemsize(dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self.order.append((name, n))
            off += n
        self.total = off
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(len(blob)) % 8)  # align the data section to 8 bytes
        head = struct.pack("<Q", len(blob)) + blob
        mode = write_mode() if direct else "cache"
        if mode != "cache":
            # big outputs (the merge engine): page-aligned chunks, written behind or direct, hashed from the chunks
            self._sink = ChunkSink(self.path, hash, mode)
            self._sink.append(head)
        else:
            self._h = _Hasher() if hash else None
            self._f = open(self.path, "wb")
            self._f.write(head)
            if self._h is not None:
                self.last_seq = self._h.put(head)
        self._i = 0
        self.bytes_written = 0
        self._data_start = 8 + len(blob)
        self._flushed = 0

    def copy_range(self, name: str, fd: int, offset: int, n: int) -> None:
        """Write tensor `name` by copying `n` bytes at `offset` of the open file `fd` (an untouched tensor of an
        input) inside the kernel — copy_file_range, else sendfile, else read/write — never through Python."""
        exp_name, exp_n = self.order[self._i]
        if name != exp_name:
            raise RuntimeError(f"writer expected {exp_name!r}, got {name!r}")
        if n != exp_n:
            raise RuntimeError(f"{name}: {n} bytes, header says {exp_n}")
        if self._sink is not None:
            self._sink.append_from(fd, offset, n)
            self._i += 1
            self.bytes_written += n
            return
        self._f.flush()
        out = self._f.fileno()
        pos = self._data_start + self.bytes_written
        done = 0
        while done < n:
            k = _copy_chunk(fd, out, offset + done, pos + done, min(n - done, 1 << 30))
            if k <= 0:
                raise OSError(f"{self.path}: input ended while copying {name} ({done} of {n} bytes)")
            done += k
        self._f.seek(pos + n)
        if self._h is not None:
            self.last_seq = self._h.put((fd, offset, n))
        self._i += 1
        self.bytes_written += n
        self._start_writeback()

    def write(self, name: str, data: torch.Tensor | memoryview | bytes) -> None:
        exp_name, exp_n = self.order[self._i]
        if name != exp_name:
            raise RuntimeError(f"writer expected {exp_name!r}, got {name!r}")
        buf = tensor_bytes(data) if isinstance(data, torch.Tensor) else memoryview(data)
        if buf.nbytes != exp_n:
            raise RuntimeError(f"{name}: {buf.nbytes} bytes, header says {exp_n}")
        if self._sink is not None:  # copied into the sink's chunks: `data` is free again when this returns
            self._sink.append(buf)
            self._i += 1
            self.bytes_written += exp_n
            return
        self._f.write(buf)
        if self._h is not None:
            self.last_seq = self._h.put(buf)
        self._i += 1
        self.bytes_written += exp_n
        self._start_writeback()

    def wait_hashed(self, seq: int) -> None:
        """Block until the bytes of write number `seq` (and all before) are hashed; no-op without hash."""
        if self._h is not None:
            self._h.wait(seq)

    def _start_writeback(self) -> None:
        """Every WRITEBACK_STEP bytes, ask the kernel to start writing the finished range to disk now
        (POSIX_FADV_DONTNEED initiates writeback of dirty pages without waiting, and drops pages already
        clean). Otherwise the dirty pages pile up until the final fsync, which then waits for all of them
        while the CPU is idle; this way the disk works while the merge computes, and the page cache holds
        little of the output."""
        end = self._data_start + self.bytes_written
        if not WRITEBACK or end - self._flushed < WRITEBACK_STEP:
            return
        self._f.flush()
        try:
            os.posix_fadvise(self._f.fileno(), self._flushed, end - self._flushed, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
        self._flushed = end

    @property
    def file_size(self) -> int:
        """Size of the complete file (header included)."""
        return self._data_start + self.total

    def sha256(self) -> str | None:
        """Hex sha256 of the file, after `close()` (None when the writer was made without hash=True)."""
        return self._digest

    def close(self) -> None:
        if self._i != len(self.order):
            self.abort()
            raise RuntimeError(f"{self.path}: only {self._i} of {len(self.order)} tensors written")
        if self._sink is not None:
            self._digest = self._sink.close()
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self._h is not None:
            self._digest = self._h.finish()

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()
            return
        if self._h is not None:
            self._h.stop()
        try:
            self._f.close()
        except OSError:
            pass


class _Hasher:
    """sha256 of a byte stream fed in order from one thread and computed on another. A job is a bytes-like
    buffer (left unchanged by the caller until `wait` covers it) or an (fd, offset, n) range of a file that
    stays open meanwhile."""

    def __init__(self):
        self._h = hashlib.sha256()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._sent = self._done = 0
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def put(self, job) -> int:
        self._sent += 1
        self._q.put(job)
        return self._sent

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            try:
                if self._error is None:
                    if isinstance(job, tuple):
                        _hash_range(self._h, *job)
                    else:
                        self._h.update(job)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self._error = e
            with self._cv:
                self._done += 1
                self._cv.notify_all()

    def wait(self, seq: int | None = None) -> None:
        seq = self._sent if seq is None else seq
        with self._cv:
            while self._done < seq:
                self._cv.wait()
        if self._error is not None:
            raise self._error

    def finish(self) -> str:
        self.wait()
        self._q.put(None)
        self._t.join()
        return self._h.hexdigest()

    def stop(self) -> None:
        self._q.put(None)


_COPY = {"how": "copy_file_range"}
WRITEBACK = os.environ.get("LORAPORT_EARLY_WRITEBACK", "1") != "0"
WRITEBACK_STEP = 64 << 20
_HASH_CHUNK = 8 << 20


def _hash_range(h, fd: int, offset: int, n: int) -> None:
    """Feed n bytes of fd at offset to the hash (the bytes copy_range just copied: they are in the page
    cache), through one reused buffer."""
    buf = bytearray(min(n, _HASH_CHUNK))
    view = memoryview(buf)
    done = 0
    while done < n:
        k = os.preadv(fd, [view[: min(n - done, len(buf))]], offset + done)
        if k <= 0:
            raise OSError(f"input ended while hashing {n} bytes at {offset}")
        h.update(view[:k])
        done += k


def read_into(fd: int, buf: memoryview, offset: int) -> int:
    """pread until `buf` is full or the file ends; the number of bytes read (the engine reads base tensors into
    its reused buffers with it, never through a memory map)."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


def _copy_chunk(src: int, dst: int, src_off: int, dst_off: int, n: int) -> int:
    """Copy up to n bytes between two files at explicit offsets (file positions untouched); bytes copied."""
    if _COPY["how"] == "copy_file_range":
        try:
            return os.copy_file_range(src, dst, n, src_off, dst_off)
        except (AttributeError, OSError):  # old kernel / Python, cross-device, unsupported filesystem
            _COPY["how"] = "pread"
    buf = os.pread(src, min(n, 64 << 20), src_off)
    if not buf:
        return 0
    return os.pwrite(dst, buf, dst_off)


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Small-file convenience (adapters, fixtures): same bytes as the streaming writer."""
    w = StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata)
    try:
        for k, v in tensors.items():
            w.write(k, v)
        w.close()
    except BaseException:
        w.abort()
        raise
