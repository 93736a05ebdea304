"""The inputs' sha256 remembered across merges (loraport.manifest.HashCache): a cached digest is reused only for
the same unchanged file, any rewrite is hashed again, and the manifest's input hashes always equal hashlib's."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import build_adapter, build_base  # noqa: E402
from loraport import manifest as mf  # noqa: E402
from loraport.merging import merge  # noqa: E402


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAPORT_NO_HASH_CACHE", raising=False)
    monkeypatch.setattr(mf, "RACY_SECONDS", 0.0)  # the files were written a moment ago
    build_base(tmp_path / "base", "tiny", seed=5)
    build_adapter(tmp_path / "ad", "tiny", rank=4, seed=6)
    return tmp_path


def _count_hashes(monkeypatch) -> list[str]:
    """Names of the *input* files hashed from here on, whole or by the reader's tap (outputs' side files are always
    hashed: not counted)."""
    seen: list[str] = []
    real = mf.sha256_file

    def counting(path, *a, **k):
        if Path(path).parent.name in ("base", "ad"):
            seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(mf, "sha256_file", counting)
    claim = mf.HashCache.claim

    def tapped(self, path, fd):  # a base the merge's reader hashes as it reads it (loraport/hash_tap.py)
        tap = claim(self, path, fd)
        if tap is not None and Path(path).parent.name in ("base", "ad"):
            seen.append(Path(path).name)
        return tap

    monkeypatch.setattr(mf.HashCache, "claim", tapped)
    return seen


def _inputs(out: Path) -> dict[str, str]:
    return json.loads((out / mf.FOLDER_MANIFEST).read_text())["inputs"]


def test_second_merge_reuses_the_base_hashes(models, monkeypatch):
    seen = _count_hashes(monkeypatch)
    merge(models / "base", [models / "ad"], models / "o1")
    first = list(seen)
    assert any(n.endswith(".safetensors") for n in first)
    assert (models / "cache" / mf.CACHE_FILE).is_file()
    seen.clear()
    merge(models / "base", [models / "ad"], models / "o2")
    assert seen == []  # every input came from the cache
    ins = _inputs(models / "o2")
    assert ins == _inputs(models / "o1")
    for p, h in ins.items():
        assert h == _sha(Path(p))


def test_adapter_files_are_hashed_once_per_run(models, monkeypatch):
    monkeypatch.setenv("LORAPORT_NO_HASH_CACHE", "1")
    seen = _count_hashes(monkeypatch)
    merge(models / "base", [models / "ad"], models / "o")
    assert seen.count("adapter_model.safetensors") == 1  # provenance and manifest share it
    assert not (models / "cache").exists()


def test_rewritten_file_is_hashed_again(models, monkeypatch):
    merge(models / "base", [models / "ad"], models / "o1")
    shard = next((models / "base").glob("*.safetensors"))
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # same size; mtime set back to what it was: only the ctime tells
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_mtime_ns == st.st_mtime_ns and shard.stat().st_size == st.st_size
    seen = _count_hashes(monkeypatch)
    merge(models / "base", [models / "ad"], models / "o2")
    assert shard.name in seen
    assert _inputs(models / "o2")[str(shard)] == _sha(shard) != _inputs(models / "o1")[str(shard)]


def test_rehash_inputs_ignores_the_cache(models, monkeypatch):
    merge(models / "base", [models / "ad"], models / "o1")
    seen = _count_hashes(monkeypatch)
    merge(models / "base", [models / "ad"], models / "o2", hash_cache=False)
    assert any(n.endswith(".safetensors") for n in seen)


def test_fresh_files_are_not_remembered(models, monkeypatch):
    monkeypatch.setattr(mf, "RACY_SECONDS", 3600.0)  # every file is "too recent" to trust its timestamps
    merge(models / "base", [models / "ad"], models / "o1")
    seen = _count_hashes(monkeypatch)
    merge(models / "base", [models / "ad"], models / "o2")
    assert any(n.endswith(".safetensors") for n in seen)


@pytest.mark.parametrize("content", ["not json", '{"schema": "other"}', "[1, 2]",
                                     '{"schema": "loraport-sha256-cache/1", "entries": {"x": [1, 2]}}'])
def test_bad_cache_file_is_ignored(models, monkeypatch, content):
    (models / "cache").mkdir()
    (models / "cache" / mf.CACHE_FILE).write_text(content)
    merge(models / "base", [models / "ad"], models / "o1")
    for p, h in _inputs(models / "o1").items():
        assert h == _sha(Path(p))
    assert json.loads((models / "cache" / mf.CACHE_FILE).read_text())["schema"] == mf.CACHE_SCHEMA


def test_forged_entry_for_another_identity_is_not_used(models, monkeypatch):
    """An entry is used only when device, inode, size, mtime and ctime all match the file now."""
    shard = next((models / "base").glob("*.safetensors"))
    st = shard.stat()
    forged = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns - 1, "0" * 64, time.time()]
    (models / "cache").mkdir()
    (models / "cache" / mf.CACHE_FILE).write_text(json.dumps(
        {"schema": mf.CACHE_SCHEMA, "entries": {os.path.realpath(shard): forged}}))
    merge(models / "base", [models / "ad"], models / "o1")
    assert _inputs(models / "o1")[str(shard)] == _sha(shard)


def test_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "CACHE_MAX", 3)
    monkeypatch.setattr(mf, "RACY_SECONDS", 0.0)
    c = mf.HashCache(tmp_path / "c")
    for i in range(5):
        f = tmp_path / f"f{i}"
        f.write_bytes(bytes([i]) * 100)
        assert c.sha256(f) == _sha(f)
    c.save()
    entries = json.loads((tmp_path / "c" / mf.CACHE_FILE).read_text())["entries"]
    assert len(entries) == 3


def test_mmap_and_read_paths_agree(tmp_path, monkeypatch):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(3 << 20) + b"tail")
    want = _sha(f)
    assert mf.sha256_file(f) == want  # read loop (under MMAP_MIN)
    monkeypatch.setattr(mf, "MMAP_MIN", 1)
    assert mf.sha256_file(f, bufsize=1 << 20) == want  # memory map, several chunks and a short last one
    (tmp_path / "empty").write_bytes(b"")
    assert mf.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_batch_hashes_the_base_once(models, monkeypatch):
    """A batch shares one cache: the base is hashed for the first job only, even with no cache on disk."""
    from loraport.batch import Job, run_jobs

    monkeypatch.setenv("LORAPORT_NO_HASH_CACHE", "1")
    build_adapter(models / "ad2", "tiny", rank=8, seed=7)
    seen = _count_hashes(monkeypatch)
    jobs = [Job([(str(models / a), 1.0)], str(models / f"out-{a}"), a) for a in ("ad", "ad2", "ad")]
    jobs[2].out = str(models / "out-again")
    results = run_jobs(models / "base", jobs)
    assert all(r.ok for r in results), [r.error for r in results]
    shards = [n for n in seen if n.startswith("model-")]
    assert sorted(shards) == sorted(set(shards)) and len(shards) == 3
    for j in jobs:
        for p, h in _inputs(Path(j.out)).items():
            assert h == _sha(Path(p))


def test_concurrent_requests_hash_a_file_once(tmp_path, monkeypatch):
    import threading

    f = tmp_path / "big"
    f.write_bytes(os.urandom(8 << 20))
    seen = []
    real = mf.sha256_file

    def slow(path, *a, **k):
        seen.append(path)
        time.sleep(0.2)  # long enough for the other threads to ask meanwhile
        return real(path, *a, **k)

    monkeypatch.setattr(mf, "sha256_file", slow)
    c = mf.HashCache(None)
    got = []
    ts = [threading.Thread(target=lambda: got.append(c.sha256(f))) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [_sha(f)] * 3 and len(seen) == 1
