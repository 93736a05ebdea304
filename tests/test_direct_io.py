"""The merge's output writer (loraport/chunk_sink.py) in both of its modes, write-behind and O_DIRECT: the same
bytes and sha256 as the page-cache writer at every chunk boundary, a clean fallback where a filesystem refuses
O_DIRECT, write errors raised (not hung on) in the producing thread, and write-behind leaving the written file
out of the page cache."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch

import loraport.safetensors_io as S
from loraport import pagecache
from loraport.chunk_sink import ChunkSink

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 64 << 10  # small chunks (16 buffers' worth of data in a test) so every boundary case is cheap


MODES = ["direct"] + (["behind"] if pagecache.write_behind() else [])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ChunkSink, "CHUNK", CHUNK)
    monkeypatch.setenv("LORAPORT_WRITE_MODE", "direct")


def _tensors(sizes: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8) for i, n in enumerate(sizes)}


def _write(path: Path, ts: dict[str, torch.Tensor], direct: bool, src: tuple[int, dict] | None = None):
    """Write `ts` (tensors named in `src[1]` are copied from the file descriptor src[0] at the given offsets)."""
    w = S.StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], {"m": "1"}, hash=True,
                          direct=direct)
    for k, v in ts.items():
        if src is not None and k in src[1]:
            w.copy_range(k, src[0], src[1][k], v.numel())
        else:
            w.write(k, v)
    w.close()
    return w


# header is ~100 bytes; these sizes put the end of the data just before, on and after chunk and page boundaries
CASES = {
    "tiny": [10],
    "one page": [4000],
    "chunk-1": [CHUNK - 200],
    "chunk+1": [CHUNK - 150, 60],
    "many chunks": [CHUNK * 3 + 17, 5, CHUNK // 2 + 4096, 1],
    "exact chunks": [2 * CHUNK],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_writer_matches_the_page_cache_writer(tmp_path, monkeypatch, case, mode):
    monkeypatch.setenv("LORAPORT_WRITE_MODE", mode)
    ts = _tensors(CASES[case])
    a = _write(tmp_path / "direct.safetensors", ts, True)
    assert a._sink is not None and a._sink.direct == (mode == "direct")
    b = _write(tmp_path / "buffered.safetensors", ts, False)
    da, db = (tmp_path / "direct.safetensors").read_bytes(), (tmp_path / "buffered.safetensors").read_bytes()
    assert da == db and len(da) == a.file_size
    assert a.sha256() == b.sha256() == hashlib.sha256(da).hexdigest()
    got = S.SafetensorsFile(tmp_path / "direct.safetensors").load_all()
    assert all(torch.equal(got[k], v) for k, v in ts.items())


@pytest.mark.parametrize("mode", MODES)
def test_copy_range_reads_unaligned_spans_into_chunks(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("LORAPORT_WRITE_MODE", mode)
    src = tmp_path / "src.bin"
    blob = os.urandom(3 * CHUNK + 999)
    src.write_bytes(blob)
    spans = {"t1": 7, "t3": CHUNK - 3}  # unaligned source offsets, spans crossing output chunks
    sizes = [100, CHUNK + 5, 33, CHUNK + 700]
    ts = _tensors(sizes)
    for k, off in spans.items():
        ts[k] = torch.frombuffer(bytearray(blob[off: off + ts[k].numel()]), dtype=torch.uint8)
    fd = os.open(src, os.O_RDONLY)
    try:
        a = _write(tmp_path / "d.safetensors", ts, True, (fd, spans))
        b = _write(tmp_path / "b.safetensors", ts, False, (fd, spans))
    finally:
        os.close(fd)
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.sha256() == b.sha256()


def test_filesystem_refusing_o_direct_at_open_gets_the_page_cache(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_direct)
    ts = _tensors(CASES["many chunks"])
    w = _write(tmp_path / "x.safetensors", ts, True)
    assert w._sink.direct is False
    monkeypatch.setattr(os, "open", real)
    _write(tmp_path / "ref.safetensors", ts, False)
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_filesystem_refusing_o_direct_at_write_gets_the_page_cache(tmp_path, monkeypatch):
    real = os.pwrite
    refused = []

    def einval_when_direct(fd, data, off):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(off)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", einval_when_direct)
    ts = _tensors(CASES["many chunks"])
    w = _write(tmp_path / "x.safetensors", ts, True)
    monkeypatch.setattr(os, "pwrite", real)
    _write(tmp_path / "ref.safetensors", ts, False)
    assert refused == [0] and w._sink.direct is False
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("at", [0, 2])
def test_write_error_reaches_the_writer_thread_and_nothing_hangs(tmp_path, monkeypatch, at, mode):
    monkeypatch.setenv("LORAPORT_WRITE_MODE", mode)
    real = os.pwrite
    calls = []

    def full(fd, data, off):
        calls.append(off)
        if len(calls) > at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", full)
    ts = _tensors([CHUNK] * 12)  # more chunks than the sink has buffers: the producer must not wait forever
    w = S.StreamingWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()],
                          hash=True, direct=True)
    before = threading.active_count()
    with pytest.raises(OSError) as ei:
        for k, v in ts.items():
            w.write(k, v)
        w.close()
    assert ei.value.errno == errno.ENOSPC
    w.abort()
    assert threading.active_count() <= before - 2  # the I/O and hash threads are gone


def test_merge_output_is_the_same_in_every_write_mode(tmp_path, monkeypatch):
    from loraport.merging import merge

    base = ROOT / "fixtures" / "peft" / "bases" / "llama"
    ad = ROOT / "fixtures" / "peft" / "adapters" / "llama_plain"
    files = {}
    for mode in [*MODES, "cache"]:
        monkeypatch.setenv("LORAPORT_WRITE_MODE", mode)
        merge(base, [(ad, 1.0)], tmp_path / mode, device="cpu")
        files[mode] = {p.name: p.read_bytes() for p in (tmp_path / mode).iterdir()}
    assert all(f == files["cache"] for f in files.values()) and any(n.endswith(".safetensors") for n in files["cache"])


def _takes_o_direct(folder: Path) -> bool:
    import mmap

    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    buf = mmap.mmap(-1, 4096)
    try:
        return os.pwrite(fd, buf, 0) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()
        probe.unlink()


def test_o_direct_is_used_where_the_filesystem_takes_it(tmp_path):
    if not _takes_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    w = _write(tmp_path / "x.safetensors", _tensors([CHUNK * 2 + 5]), True)
    assert w._sink.direct, "the filesystem takes O_DIRECT but the writer fell back to the page cache"
