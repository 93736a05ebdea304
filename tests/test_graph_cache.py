"""The graph cache (loraport/onnx/graph_cache.py): an export whose graph was captured before reads it back
instead of tracing, and must write exactly the bytes a fresh capture writes; a damaged cache is a miss, never an
error; keys follow everything that shapes a graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraport.onnx import graph_cache
from loraport.onnx.export import export_onnx
from tests._onnx_util import ADAPTERS, LLAMA, ROOT

PLAIN, PLAIN2 = ADAPTERS / "llama_plain", ADAPTERS / "llama_plain2"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, bytes], Path]:
    """One cold export (llama + llama_plain, defaults) with the cache on: its files and its cache entry."""
    work = tmp_path_factory.mktemp("graph-cache-ref")
    saved = {k: os.environ.get(k) for k in ("LORAPORT_CACHE_DIR", "LORAPORT_NO_GRAPH_CACHE")}
    os.environ["LORAPORT_CACHE_DIR"] = str(work / "cache")
    os.environ.pop("LORAPORT_NO_GRAPH_CACHE", None)
    try:
        assert _export(work / "out")["graph"] == "capture"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    (entry,) = (work / "cache" / "graphs").iterdir()
    return _files(work / "out"), entry


def _seed(cache: Path, entry: Path) -> Path:
    """Put a copy of the reference's cache entry into this test's cache."""
    import shutil

    cache.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(entry, cache / entry.name))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAPORT_CACHE_DIR", str(root))
    monkeypatch.delenv("LORAPORT_NO_GRAPH_CACHE", raising=False)
    return root / "graphs"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export(out: Path, adapters=((PLAIN, 1.0),), **kw) -> dict:
    return export_onnx(LLAMA, [(str(a), w) for a, w in adapters], out, **kw)


CASES = {
    "merged": dict(),
    "multi-lora": dict(multi_lora=True, adapters=((PLAIN, 1.0), (PLAIN2, 1.0))),
    "with-past": dict(with_past=True),
    "int4": dict(quantize="int4"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_graph_writes_the_same_bytes_as_a_capture(cache, tmp_path, case):
    kw = dict(CASES[case])
    first = _export(tmp_path / "first", **kw)
    assert first["graph"] == "capture"
    assert len(list(cache.iterdir())) == 1
    again = _export(tmp_path / "again", **kw)
    assert again["graph"] == "cache"
    assert again["imports_left_out"] == []
    ref = _files(tmp_path / "first")
    assert ref == _files(tmp_path / "again")
    assert any(k.endswith(".onnx") for k in ref)
    if case == "merged":
        fresh = _export(tmp_path / "fresh", recapture=True, **kw)
        assert fresh["graph"] == "capture" and _files(tmp_path / "fresh") == ref


def test_key_follows_config_options_and_is_canonical():
    cfg = json.loads((LLAMA / "config.json").read_text())
    k = graph_cache.key(cfg, "fp32", 20, None, False)
    assert k == graph_cache.key(dict(reversed(list(cfg.items()))), "fp32", 20, None, False)
    changed = {**cfg, "rope_theta": float(cfg.get("rope_theta", 10000.0)) * 2}
    others = [
        graph_cache.key(changed, "fp32", 20, None, False),
        graph_cache.key(cfg, "fp16", 20, None, False),
        graph_cache.key(cfg, "fp32", 21, None, False),
        graph_cache.key(cfg, "fp32", 20, None, True),
        graph_cache.key(cfg, "fp32", 20, {"model.layers.0.self_attn.q_proj.weight": (64, 64)}, False),
        graph_cache.key(cfg, "fp32", 20, {"model.layers.0.self_attn.q_proj.weight": (64, 32)}, False),
    ]
    assert len({k, *others}) == len(others) + 1


def _damage(entry: Path, how: str) -> None:
    g, m, b = entry / graph_cache.GRAPH, entry / graph_cache.META, entry / graph_cache.BUFFERS
    if how == "truncated graph":
        g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    elif how == "flipped byte":
        data = bytearray(g.read_bytes())
        data[len(data) // 3] ^= 0x40
        g.write_bytes(bytes(data))
    elif how == "garbage meta":
        m.write_text("{not json")
    elif how == "meta of another key":
        d = json.loads(m.read_text())
        d["key"] = "0" * 64
        m.write_text(json.dumps(d))
    elif how == "meta with wrong types":
        d = json.loads(m.read_text())
        d["inits"] = [["x", "not-a-dtype", [1]]]
        m.write_text(json.dumps(d))
    elif how == "buffers missing":
        b.unlink()
    elif how == "forged, self-consistent meta":  # another graph, every sha256 recomputed, signed without our key
        from tests._hostile_classes import forge_meta

        forge_meta(entry, os.urandom(32))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated graph", "flipped byte", "garbage meta", "meta of another key",
                                 "meta with wrong types", "buffers missing", "forged, self-consistent meta"])
def test_damaged_entry_is_a_miss_and_is_replaced(reference, cache, tmp_path, how):
    files, entry = reference
    _damage(_seed(cache, entry), how)
    rep = _export(tmp_path / "after")
    assert rep["graph"] == "capture"
    assert _files(tmp_path / "after") == files
    assert graph_cache.load(entry.name) is not None  # the capture stored a good entry again


def test_seeded_entry_is_used(reference, cache, tmp_path):
    files, entry = reference
    _seed(cache, entry)
    assert _export(tmp_path / "hit")["graph"] == "cache"
    assert _files(tmp_path / "hit") == files


def test_disabled_cache_neither_reads_nor_writes(reference, cache, tmp_path, monkeypatch):
    files, entry = reference
    _seed(cache, entry)
    monkeypatch.setenv("LORAPORT_NO_GRAPH_CACHE", "1")
    assert _export(tmp_path / "a")["graph"] == "capture"
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert _files(tmp_path / "a") == files


def test_unwritable_cache_only_costs_time(reference, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # the cache root is a file: nothing can be stored under it
    monkeypatch.setenv("LORAPORT_CACHE_DIR", str(blocker))
    monkeypatch.delenv("LORAPORT_NO_GRAPH_CACHE", raising=False)
    assert _export(tmp_path / "a")["graph"] == "capture"
    assert _files(tmp_path / "a") == reference[0]


def test_entries_are_bounded_least_recently_used_first(cache, tmp_path, monkeypatch):
    _export(tmp_path / "ref")
    (entry,) = cache.iterdir()
    cap = graph_cache.load(entry.name)
    assert cap is not None
    os.utime(entry / graph_cache.META, (999, 999))
    keys = [f"{i:064x}" for i in range(5)]
    for i, k in enumerate(keys):
        assert graph_cache.store(k, cap)
        os.utime(cache / k / graph_cache.META, (1000 + i, 1000 + i))
    assert len(list(cache.iterdir())) == 6
    assert graph_cache.load(keys[0]) is not None  # the oldest, used now: kept
    monkeypatch.setattr(graph_cache, "MAX_ENTRIES", 3)
    assert graph_cache.store(f"{9:064x}", cap)
    assert {p.name for p in cache.iterdir()} == {keys[0], keys[4], f"{9:064x}"}


def test_cli_hit_does_not_import_transformers_and_recapture_does(reference, cache, tmp_path):
    """The point of the cache: a hit never loads transformers' modeling code or torch's exporter."""
    files, entry = reference
    _seed(cache, entry)
    code = ("import sys, json\n"
            "from loraport.cli import main\n"
            "try:\n"
            "    main(sys.argv[1:], prog_name='loraport')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(json.dumps({'transformers': 'transformers' in sys.modules, 'exporter': any(m.startswith("
            "'torch.onnx._internal.exporter') for m in sys.modules)}), file=sys.stderr)\n")

    def run(out: str, *extra: str) -> tuple[dict, dict]:
        r = subprocess.run([sys.executable, "-c", code, "convert", "--to", "onnx", "--base", str(LLAMA), "--adapter",
                            str(PLAIN), "--out", str(tmp_path / out), "--json", *extra], capture_output=True,
                           text=True, cwd=str(ROOT), env=dict(os.environ), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout), json.loads(r.stderr.strip().splitlines()[-1])

    rep, mods = run("hit")
    assert rep["graph"] == "cache" and not mods["transformers"] and not mods["exporter"]
    rep, mods = run("again", "--recapture")
    assert rep["graph"] == "capture" and mods["transformers"] and mods["exporter"]
    assert _files(tmp_path / "hit") == _files(tmp_path / "again") == files


def test_two_processes_capturing_the_same_graph_at_once(cache, tmp_path):
    """Two cold exports of one architecture racing on one cache: both succeed, same bytes, one entry left."""
    argv = [sys.executable, "-m", "loraport", "convert", "--to", "onnx", "--base", str(LLAMA), "--adapter",
            str(PLAIN), "--json", "--out"]
    procs = [subprocess.Popen([*argv, str(tmp_path / f"p{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=str(ROOT)) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
    assert _files(tmp_path / "p0") == _files(tmp_path / "p1")
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    assert _export(tmp_path / "after")["graph"] == "cache"


def test_cache_command_reports_and_clears_only_its_own_files(reference, cache, tmp_path):
    from tests._onnx_util import cli

    _seed(cache, reference[1])
    root = cache.parent
    (root / "notes.txt").write_text("the user's own file")
    r = cli("cache", "info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["root"] == str(root) and info["graphs"] == 1 and info["graph_bytes"] > 0
    assert info["hash_entries"] == 0
    r = cli("merge", "--base", str(LLAMA), "--adapter", str(PLAIN), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(cli("cache", "info", "--json").stdout)["hash_entries"] >= 2  # base files + adapter
    r = cli("cache", "clear", "--hashes", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["removed_graphs"] == 0 and rep["removed_hash_entries"] >= 2 and cache.is_dir()
    assert json.loads(cli("cache", "info", "--json").stdout)["hash_entries"] == 0
    r = cli("cache", "clear", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["removed_graphs"] == 1
    assert not cache.exists() and (root / "notes.txt").read_text() == "the user's own file"
    assert _export(tmp_path / "after")["graph"] == "capture"
