"""The chunked writer's batched writes (loraport/chunk_sink.py, O_DIRECT here): chunks that wait for a slow
disk in consecutive slots of the ring go out as one larger pwrite, and the file and its sha256 are still exactly the
page-cache writer's, at chunk boundaries and with the last chunk partial."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch

import loraport.safetensors_io as S
from loraport.chunk_sink import ChunkSink

CHUNK = 64 << 10


@pytest.mark.parametrize("sizes", [[CHUNK * 11 + 123], [CHUNK * 8 - 100, 7, CHUNK * 3], [CHUNK * 12]])
def test_queued_chunks_are_written_together_and_the_bytes_are_the_same(tmp_path, monkeypatch, sizes):
    monkeypatch.setattr(ChunkSink, "CHUNK", CHUNK)
    monkeypatch.setenv("LORAPORT_WRITE_MODE", "direct")
    g = torch.Generator().manual_seed(len(sizes))
    ts = {f"t{i}": torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8) for i, n in enumerate(sizes)}
    real, writes = os.pwrite, []

    def slow_disk(fd, data, off):  # the producer fills the ring while a write is in flight
        writes.append((off, len(data)))
        time.sleep(0.01)
        return real(fd, data, off)

    def write(path, direct):
        w = S.StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], hash=True, direct=direct)
        for k, v in ts.items():
            w.write(k, v)
        w.close()
        return w

    monkeypatch.setattr(os, "pwrite", slow_disk)
    w = write(tmp_path / "direct.safetensors", True)
    monkeypatch.setattr(os, "pwrite", real)
    write(tmp_path / "ref.safetensors", False)
    data = (tmp_path / "direct.safetensors").read_bytes()
    assert data == (tmp_path / "ref.safetensors").read_bytes()
    assert w.sha256() == hashlib.sha256(data).hexdigest()
    assert max(n for _, n in writes) > CHUNK, f"no write took more than one chunk: {writes}"
    assert max(n for _, n in writes) <= CHUNK * ChunkSink.NBUF
    ends = sorted(writes)
    assert all(a + n == b for (a, n), (b, _) in zip(ends, ends[1:]))  # contiguous, no overlap, no gap
