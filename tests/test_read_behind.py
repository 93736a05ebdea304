"""The merge's page-cache policy for big files (loraport/pagecache.py) and the base's sha256 taken from the bytes
the merge reads (loraport/hash_tap.py): outputs written behind leave the cache; a base too big to stay cached
leaves it behind the reader; the tap's digest is the file's sha256 whatever order and gaps the reads come in, and a
tap that cannot finish publishes nothing, so the file is hashed whole instead — never a wrong digest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import loraport.safetensors_io as S
from loraport import manifest as mf
from loraport import pagecache
from loraport.chunk_sink import ChunkSink

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "fixtures" / "peft" / "bases" / "llama"
ADAPTER = ROOT / "fixtures" / "peft" / "adapters" / "llama_plain"
needs_behind = pytest.mark.skipif(not pagecache.write_behind(), reason="no sync_file_range on this system")
needs_fincore = pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore not installed")


def _resident(path: Path) -> int:
    """Bytes of `path` in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@needs_behind
@needs_fincore
def test_write_behind_leaves_the_output_out_of_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(ChunkSink, "CHUNK", 256 << 10)
    monkeypatch.setattr(pagecache, "WINDOW", 4 << 20)
    data = torch.randint(0, 255, (24 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    resident, files = {}, {}
    for mode in ("behind", "cache"):
        monkeypatch.setenv("LORAPORT_WRITE_MODE", mode)
        p = files[mode] = tmp_path / f"{mode}.safetensors"
        w = S.StreamingWriter(p, [("t", torch.uint8, (data.numel(),))], hash=True, direct=True)
        w.write("t", data)
        w.close()
        resident[mode] = _resident(p)  # before anything reads the file back
        assert w.sha256() == hashlib.sha256(p.read_bytes()).hexdigest()
    assert files["behind"].read_bytes() == files["cache"].read_bytes()
    assert resident["behind"] <= (4 << 20) + pagecache.FOLIO, resident  # at most the last window
    assert resident["cache"] > resident["behind"], resident  # the control: the page-cache writer's file stays


def _file_with_gaps(tmp_path: Path) -> tuple[Path, bytes]:
    blob = os.urandom(5 * (1 << 20) + 12345)
    p = tmp_path / "f.bin"
    p.write_bytes(blob)
    return p, blob


def _tap(path: Path, cache: mf.HashCache):
    fd = os.open(path, os.O_RDONLY)
    tap = cache.claim(path, fd)
    assert tap is not None
    return fd, tap


@pytest.mark.parametrize("spans", [
    [],  # nothing read by the merge: the tap reads it all
    [(0, 100)], [(8, 1 << 20), (3 << 20, 5)],  # header-like start, gaps, tail
    [(1 << 20, 1 << 20), (2 << 20, 4096), ((2 << 20) + 4096, 3 << 20)],  # adjacent spans, up to the end
])
def test_tap_digest_is_the_files_sha256(tmp_path, monkeypatch, spans):
    monkeypatch.setattr("loraport.hash_tap.GAP_BUF", 1 << 16)  # gaps cross many reads
    p, blob = _file_with_gaps(tmp_path)
    cache = mf.HashCache(None)
    fd, tap = _tap(p, cache)
    try:
        for off, n in spans:
            n = min(n, len(blob) - off)
            assert tap.feed(off, memoryview(blob[off:off + n]))
        tap.finish()
    finally:
        os.close(fd)
    assert cache.known(p) == hashlib.sha256(blob).hexdigest()
    assert cache.sha256(p) == hashlib.sha256(blob).hexdigest()


def test_out_of_order_or_unfinished_tap_publishes_nothing_and_the_file_is_hashed_whole(tmp_path):
    p, blob = _file_with_gaps(tmp_path)
    want = hashlib.sha256(blob).hexdigest()
    for how in ("out of order", "closed"):
        cache = mf.HashCache(None)
        fd, tap = _tap(p, cache)
        try:
            assert cache.claim(p, fd) is None  # one tap per file at a time
            assert tap.feed(1 << 20, memoryview(blob[1 << 20:(1 << 20) + 10]))
            if how == "out of order":
                assert not tap.feed(0, memoryview(blob[:10])) and tap.broken
                tap.finish()
            else:
                tap.close()
        finally:
            os.close(fd)
        assert cache.known(p) is None, how
        assert cache.sha256(p) == want, how  # hashed whole by the one who asked


def test_a_file_changed_while_tapped_is_not_remembered(tmp_path):
    p, blob = _file_with_gaps(tmp_path)
    cache = mf.HashCache(None)
    fd, tap = _tap(p, cache)
    try:
        tap.feed(0, memoryview(blob[:100]))
        with open(p, "r+b") as f:  # another program rewrites the end
            f.seek(len(blob) - 10)
            f.write(b"x" * 10)
        tap.finish()
    finally:
        os.close(fd)
    assert cache.known(p) is None
    assert cache.sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def _llama_base(root: Path) -> tuple[Path, Path]:
    """A llama-named base in two shards (~50 MB: many page-cache folios) and a LoRA on q/v only, so most tensors
    are copied untouched (the tap reads those itself)."""
    from loraport.safetensors_io import save_file

    g = torch.Generator().manual_seed(0)
    dim, ffn, layers, rank = 512, 1408, 4, 4
    base, ad = root / "base", root / "adapter"
    base.mkdir()
    ad.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": dim,
                                                  "num_hidden_layers": layers, "torch_dtype": "float32"}))
    shapes = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{m}.weight"] = (dim, dim)
        for m, shp in (("gate_proj", (ffn, dim)), ("up_proj", (ffn, dim)), ("down_proj", (dim, ffn))):
            shapes[f"model.layers.{i}.mlp.{m}.weight"] = shp
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (dim,)
    names = sorted(shapes)
    wm = {}
    for k, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        fn = f"model-0000{k}-of-00002.safetensors"
        save_file({n: torch.randn(shapes[n], generator=g) for n in chunk}, base / fn, {"format": "pt"})
        wm.update({n: fn for n in chunk})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    lora = {}
    for n in names:
        if n.endswith(("q_proj.weight", "v_proj.weight")):
            mod = "base_model.model." + n[: -len(".weight")]
            lora[f"{mod}.lora_A.weight"] = torch.randn(rank, dim, generator=g) * 0.01
            lora[f"{mod}.lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.01
    save_file(lora, ad / "adapter_model.safetensors", {"format": "pt"})
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                                                         "target_modules": ["q_proj", "v_proj"]}))
    return base, ad


@needs_fincore
def test_big_base_is_hashed_by_the_reader_and_dropped_behind_it(tmp_path, monkeypatch):
    """A base 'too big to stay cached' (the threshold lowered to the test's size): the merged bytes and the
    manifest are exactly those of a normal merge, the manifest's base digests are the files' sha256, the reader
    hashed them (no second reader), and the base has left the page cache (but for its last partial folio)."""
    from loraport.merging import merge

    base, ad = _llama_base(tmp_path)
    shards = sorted(base.glob("model-*.safetensors"))
    monkeypatch.setenv("LORAPORT_NO_HASH_CACHE", "1")
    merge(base, [(ad, 1.0)], tmp_path / "normal", device="cpu")
    assert all(_resident(f) > f.stat().st_size // 2 for f in shards)  # the control: a small base stays cached

    monkeypatch.setattr(pagecache, "DROP_FRACTION", 1 << 40)
    hashed_whole = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p, *a, **k: hashed_whole.append(Path(p).name) or real(p, *a, **k))
    merge(base, [(ad, 1.0)], tmp_path / "dropped", device="cpu")
    assert not {f.name for f in shards} & set(hashed_whole), hashed_whole
    for f in shards:
        assert _resident(f) <= pagecache.FOLIO, (f.name, _resident(f), f.stat().st_size)

    a = {p.name: p.read_bytes() for p in (tmp_path / "normal").iterdir()}
    b = {p.name: p.read_bytes() for p in (tmp_path / "dropped").iterdir()}
    man_a, man_b = json.loads(a.pop(mf.FOLDER_MANIFEST)), json.loads(b.pop(mf.FOLDER_MANIFEST))
    assert a == b
    assert man_a["inputs"] == man_b["inputs"]
    for f in shards:
        assert hashlib.sha256(f.read_bytes()).hexdigest() in json.dumps(man_b["inputs"])


@needs_behind
@pytest.mark.parametrize("err", ["EINVAL", "EIO"])
def test_a_file_system_without_sync_file_range_is_written_anyway_but_write_errors_raise(tmp_path, monkeypatch, err):
    """sync_file_range refused (FUSE, network file systems: EINVAL, ESPIPE...) only turns write-behind off for
    that file; an I/O error from the writeback is a write error like any other."""
    import errno

    def refuse(fd, off, n, flags):
        raise OSError(getattr(errno, err), err)

    monkeypatch.setattr(pagecache, "_range", refuse)
    monkeypatch.setattr(ChunkSink, "CHUNK", 64 << 10)
    monkeypatch.setenv("LORAPORT_WRITE_MODE", "behind")
    data = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    p = tmp_path / "x.safetensors"
    w = S.StreamingWriter(p, [("t", torch.uint8, (data.numel(),))], hash=True, direct=True)
    if err == "EIO":
        with pytest.raises(OSError) as ei:
            w.write("t", data)
            w.close()
        assert ei.value.errno == errno.EIO
        w.abort()
        return
    w.write("t", data)
    w.close()
    assert w._sink._behind.off
    assert torch.equal(S.SafetensorsFile(p).load_all()["t"], data)
