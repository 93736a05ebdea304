"""Trust no folder: the cache folder may be shared, restored from elsewhere or written by someone else, a batch
folder may hold two adapters with one output name, and two processes may write the same output at once.

- cache entries are used, pruned and cleared only when their HMAC (the user's key, kept outside the cache)
  verifies: a forged graph or sha256 is never used, a user's own files under the cache are never removed;
- an unusable key file turns the cache off with a warning, outputs unchanged;
- a batch whose adapters map to one output name is refused before anything is written;
- a temporary whose owner is alive is never swept, whatever its suffix; a dead owner's is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from loraport import cache_key
from loraport import manifest as mf
from loraport.onnx import graph_cache
from tests._hostile_classes import colliding_batch, forge_hash_entry, forge_meta, tiny_capture
from tests._onnx_util import ADAPTERS, LLAMA, ROOT, cli

PLAIN, PLAIN2 = ADAPTERS / "llama_plain", ADAPTERS / "llama_plain2"
LLM = ROOT / "fixtures" / "llm"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAPORT_CACHE_DIR", str(root))
    monkeypatch.delenv("LORAPORT_NO_GRAPH_CACHE", raising=False)
    monkeypatch.delenv("LORAPORT_NO_HASH_CACHE", raising=False)
    return root


# ------------------------------------------------------------------------------------------------ graph cache
def test_forged_graph_entry_is_never_used_and_is_rebuilt(cache):
    """A graph entry swapped in with a self-consistent meta (sha256s recomputed, signed with another key or not
    at all) is not loaded, and the next store replaces it with a genuine one. (The end-to-end case, an export
    that traces again and writes the genuine bytes, is test_graph_cache.py's "forged, self-consistent meta".)"""
    k = "12" * 32
    assert graph_cache.store(k, tiny_capture("genuine"))
    entry = cache / "graphs" / k
    genuine = _files(entry)
    assert graph_cache.load(k).proto.graph.node[0].name == "genuine"
    for attacker_key in (None, os.urandom(32)):
        forge_meta(entry, attacker_key)
        assert (entry / graph_cache.GRAPH).read_bytes() != genuine[graph_cache.GRAPH]
        assert graph_cache.load(k) is None
        assert entry.is_dir()  # not ours, so not removed by a reader; the next capture replaces it:
        assert graph_cache.store(k, tiny_capture("genuine"))
        assert {n: b for n, b in _files(entry).items() if n != graph_cache.META} == \
            {n: b for n, b in genuine.items() if n != graph_cache.META}
        assert graph_cache.load(k).proto.graph.node[0].name == "genuine"


def test_clear_removes_only_what_it_can_prove_it_wrote(cache):
    """LORAPORT_CACHE_DIR pointed at a folder of the user's own, with a `graphs/` folder of theirs: `cache clear`
    removes loraport's authenticated entries and dead writers' temporaries; everything else stays, listed."""
    graphs = cache / "graphs"
    graphs.mkdir(parents=True)
    (graphs / "plot.png").write_bytes(b"\x89PNG the user's")
    (graphs / "mine").mkdir()
    (graphs / "mine" / "notes.txt").write_text("theirs")
    k = "ab" * 32
    assert graph_cache.store(k, tiny_capture("ours"))
    # a folder named like an entry, holding an entry's files, but not signed by this user: not provably ours
    lookalike = graphs / ("cd" * 32)
    shutil.copytree(graphs / k, lookalike)
    forge_meta(lookalike, None)
    meta = json.loads((lookalike / graph_cache.META).read_text())
    meta["key"] = lookalike.name
    (lookalike / graph_cache.META).write_text(json.dumps(meta))
    dead = _dead_pid()
    stale = graphs / f"{graph_cache.TMP_PREFIX}{dead}-x1"
    stale.mkdir()
    (stale / graph_cache.GRAPH).write_bytes(b"half")
    with _live_process() as live:
        busy = graphs / f"{graph_cache.TMP_PREFIX}{live}-x2"
        busy.mkdir()
        (busy / graph_cache.GRAPH).write_bytes(b"being written")
        from loraport.commands.cache import cache_info

        info = cache_info()
        assert info["graphs"] == 1 and info["key_ok"] and info["key_file"] == os.environ["LORAPORT_KEY_FILE"]
        assert sorted(Path(u).name for u in info["unverified"]) == sorted(["mine", "plot.png", lookalike.name])
        r = cli("cache", "clear", "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["removed_graphs"] == 1
        assert sorted(Path(s).name for s in rep["skipped"]) == sorted(["mine", "plot.png", lookalike.name])
        assert busy.is_dir() and (busy / graph_cache.GRAPH).read_bytes() == b"being written"
    assert not (graphs / k).exists() and not stale.exists()
    assert (graphs / "plot.png").read_bytes() == b"\x89PNG the user's"
    assert (graphs / "mine" / "notes.txt").read_text() == "theirs"
    assert (lookalike / graph_cache.GRAPH).is_file()


def test_prune_never_counts_or_removes_what_is_not_ours(cache, monkeypatch):
    graphs = cache / "graphs"
    graphs.mkdir(parents=True)
    (graphs / "a-user-file").write_text("x")
    monkeypatch.setattr(graph_cache, "MAX_ENTRIES", 1)
    for i in range(3):
        assert graph_cache.store(f"{i:064x}", tiny_capture(str(i)))
        os.utime(graphs / f"{i:064x}" / graph_cache.META, (1000 + i, 1000 + i))
    assert graph_cache.store(f"{9:064x}", tiny_capture("9"))
    assert sorted(p.name for p in graphs.iterdir()) == sorted(["a-user-file", f"{9:064x}"])


def test_store_never_replaces_a_users_folder_at_an_entry_path(cache):
    k = "ef" * 32
    (cache / "graphs" / k).mkdir(parents=True)
    (cache / "graphs" / k / "thesis.tex").write_text("theirs")
    assert graph_cache.store(k, tiny_capture("x")) is False
    assert (cache / "graphs" / k / "thesis.tex").read_text() == "theirs"
    assert not [p for p in (cache / "graphs").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ hash cache
@pytest.fixture
def models(cache, tmp_path, monkeypatch):
    from bench.common import build_adapter, build_base

    monkeypatch.setattr(mf, "RACY_SECONDS", 0.0)  # the files were written a moment ago
    build_base(tmp_path / "base", "tiny", seed=5)
    build_adapter(tmp_path / "ad", "tiny", rank=4, seed=6)
    return tmp_path


def _inputs(out: Path) -> dict[str, str]:
    return json.loads((out / mf.FOLDER_MANIFEST).read_text())["inputs"]


@pytest.mark.parametrize("signed", ["unsigned", "attacker's key"])
def test_forged_hash_entry_is_ignored(models, cache, signed):
    """An entry with the file's exact identity but a wrong digest, written by someone without the key: the
    manifest still records the true sha256 (and the forged file is replaced by a genuine one)."""
    from loraport.merging import merge

    merge(models / "base", [models / "ad"], models / "o1")
    path = cache / mf.CACHE_FILE
    d = json.loads(path.read_text())
    shard = next((models / "base").glob("*.safetensors"))
    assert d["entries"][os.path.realpath(shard)][5] == _sha(shard)
    forge_hash_entry(path, os.path.realpath(shard), None if signed == "unsigned" else os.urandom(32))
    merge(models / "base", [models / "ad"], models / "o2")
    assert _inputs(models / "o2")[str(shard)] == _sha(shard)
    assert json.loads(path.read_text())["entries"][os.path.realpath(shard)][5] == _sha(shard)


# ------------------------------------------------------------------------------------------------ the key file
def _key_cases(tmp_path: Path, cache: Path) -> dict[str, Path]:
    good = "0123456789abcdef" * 4 + "\n"
    cases = {}
    for name, mode in (("group-readable", 0o640), ("world-writable", 0o602)):
        p = tmp_path / name / "cache.key"
        p.parent.mkdir(parents=True)
        p.write_text(good)
        os.chmod(p, mode)
        cases[name] = p
    p = tmp_path / "malformed.key"
    p.write_text("not a key")
    os.chmod(p, 0o600)
    cases["malformed"] = p
    target = tmp_path / "real.key"
    target.write_text(good)
    os.chmod(target, 0o600)
    (tmp_path / "link.key").symlink_to(target)
    cases["symlink"] = tmp_path / "link.key"
    inside = cache / "cache.key"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_text(good)
    os.chmod(inside, 0o600)
    cases["inside the cache"] = inside
    if os.geteuid() == 0:  # root can give a file away: a key owned by someone else
        other = tmp_path / "other.key"
        other.write_text(good)
        os.chmod(other, 0o600)
        os.chown(other, 4242, 4242)
        cases["foreign owner"] = other
    return cases


def test_unusable_key_turns_the_cache_off_with_a_warning(models, cache, tmp_path, monkeypatch):
    from loraport.merging import merge

    cases = _key_cases(tmp_path / "keys", cache)
    shard = next((models / "base").glob("*.safetensors"))
    for i, (why, path) in enumerate(cases.items()):
        monkeypatch.setenv(cache_key.KEY_ENV, str(path))
        before = path.read_bytes()
        with pytest.warns(cache_key.CacheKeyWarning):
            assert cache_key.load() is None, why
        assert not cache_key.status()["key_ok"], why
        assert graph_cache.disabled(), why
        out = models / f"o{i}"
        merge(models / "base", [models / "ad"], out)  # warned once already: still correct, nothing cached
        assert _inputs(out)[str(shard)] == _sha(shard), why
        assert not (cache / mf.CACHE_FILE).exists(), why
        assert path.read_bytes() == before, why  # never "repaired" behind the user's back


def test_key_is_made_private_on_first_use_and_kept(tmp_path, monkeypatch):
    path = tmp_path / "cfg" / "loraport" / "cache.key"
    monkeypatch.setenv(cache_key.KEY_ENV, str(path))
    k = cache_key.load()
    assert k is not None and len(k) == 32
    assert (path.stat().st_mode & 0o777) == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700
    assert cache_key.load() == k
    assert [p.name for p in path.parent.iterdir()] == ["cache.key"]  # no temporary left


# ------------------------------------------------------------------------------------------------ batch
def test_batch_output_name_collision_is_refused_before_any_write(tmp_path):
    """`tuned.gguf` and `tuned/` both map to OUT/tuned: with --overwrite one result would silently replace the
    other. Refused in one line naming both inputs and the output; nothing is created or changed."""
    from click.testing import CliRunner

    from loraport.cli import main

    d = tmp_path / "adapters"
    colliding_batch(d)
    base = LLM / "bases" / "llama"
    for out in (tmp_path / "new-outs", tmp_path / "old-outs"):
        if out.name == "old-outs":
            out.mkdir()
            (out / "tuned").mkdir()
            (out / "tuned" / "model.safetensors").write_bytes(b"a previous result")
        before = _files(out) if out.exists() else None
        r = CliRunner().invoke(main, ["merge", "--base", str(base), "--adapter-dir", str(d), "--out", str(out),
                                      "--overwrite"])
        assert r.exit_code == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        assert str(d / "tuned.gguf") in lines[0] and str(d / "tuned") in lines[0]
        assert str(out / "tuned") in lines[0]
        assert (_files(out) if out.exists() else None) == before
    assert not (tmp_path / "new-outs").exists()


def test_jobs_file_collision_names_both_jobs(tmp_path):
    from loraport.batch import jobs_from_file
    from loraport.errors import BadInputError

    jf = tmp_path / "jobs.json"
    jf.write_text(json.dumps([{"adapter": "a1", "out": "outs/x"}, {"adapter": "b2", "out": "outs/../outs/x"}]))
    with pytest.raises(BadInputError, match=r"a1 and .*b2 would both write"):
        jobs_from_file(jf)


# ------------------------------------------------------------------------------------------------ temporaries
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class _live_process:
    def __enter__(self) -> int:
        self.p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        return self.p.pid

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def test_sweep_spares_live_owners_whatever_the_suffix_and_removes_dead_ones(tmp_path):
    from loraport.outputs import OLD_TAG, TMP_TAG, sweep_stale

    out = tmp_path / "model.onnx"
    dead = _dead_pid()
    with _live_process() as live:
        names = {who: [f".{out.name}{TMP_TAG}{pid}", f".{out.name}{TMP_TAG}{pid}.data",
                       f".{out.name}{OLD_TAG}{pid}"] for who, pid in (("live", live), ("dead", dead))}
        for ns in names.values():
            for n in ns:
                (tmp_path / n).write_bytes(b"x")
        (tmp_path / f".{out.name}{TMP_TAG}notapid").write_bytes(b"not ours")
        out.write_bytes(b"current")
        sweep_stale(out)
        left = {p.name for p in tmp_path.iterdir()}
    assert set(names["live"]) <= left
    assert not set(names["dead"]) & left
    assert f".{out.name}{TMP_TAG}notapid" in left and out.read_bytes() == b"current"


def _bake_base(folder: Path) -> Path:
    """A small real ONNX model holding llama's weights (stored transposed, external data) for every module
    llama_plain targets: bakeable by name."""
    from onnx import TensorProto, helper, numpy_helper

    from loraport.formats import load_adapter
    from loraport.safetensors_io import SafetensorsFile

    w = SafetensorsFile(LLAMA / "model.safetensors").load_all()
    nodes, inits, ins, outs = [], [], [], []
    for i, t in enumerate(sorted({d.target for d in load_adapter(str(PLAIN)).deltas})):
        W = w[t].float().numpy()
        inits.append(numpy_helper.from_array(W.T.copy(), t))
        ins.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, W.shape[1]]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, W.shape[0]]))
        nodes.append(helper.make_node("MatMul", [f"x{i}", t], [f"y{i}"]))
    model = helper.make_model(helper.make_graph(nodes, "g", ins, outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "base.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="base.onnx.data", size_threshold=0)
    return path


_SLOW_BAKE = """
import sys, time
from pathlib import Path
import loraport.onnx.baking as b
real = b.ExternalDataWriter.close
def close(self):  # the data temporary is complete and still unrenamed: hold here until told to go on
    real(self)
    Path(sys.argv[1]).touch()
    while not Path(sys.argv[2]).exists():
        time.sleep(0.02)
b.ExternalDataWriter.close = close
from loraport.cli import main
main(sys.argv[3:], prog_name="loraport")
"""


def test_two_concurrent_bakes_of_one_output_both_succeed(tmp_path):
    """Process B holds its finished data temporary (`.<out>.loraport-tmp-<pid>.data`) while process A bakes
    the same output with --overwrite (A sweeps stale temporaries first). B's live temporary survives: both
    succeed, and the output each leaves is byte-identical to a bake run alone."""
    from loraport.onnx import bake

    base = _bake_base(tmp_path)
    refs = {}
    for name, ad in (("a", PLAIN), ("b", PLAIN2)):
        (tmp_path / f"ref-{name}").mkdir()
        bake(str(base), [(str(ad), 1.0)], str(tmp_path / f"ref-{name}" / "out.onnx"))
        refs[name] = _files(tmp_path / f"ref-{name}")
    assert refs["a"] != refs["b"]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.onnx"
    held, go = tmp_path / "held", tmp_path / "go"
    argv = ["merge", "--base", str(base), "--out", str(out), "--overwrite", "--json", "--adapter"]
    b = subprocess.Popen([sys.executable, "-c", _SLOW_BAKE, str(held), str(go), *argv, str(PLAIN2)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        t0 = time.time()
        while not held.exists():
            assert b.poll() is None, b.communicate()[1][-2000:]
            assert time.time() - t0 < 240, "the held bake never reached its data temporary"
            time.sleep(0.05)
        assert any(p.name.endswith(".data") and ".loraport-tmp-" in p.name for p in work.iterdir())
        a = cli("merge", "--base", str(base), "--adapter", str(PLAIN), "--out", str(out), "--overwrite", "--json")
        assert a.returncode == 0, a.stderr[-2000:]
        assert {k: v for k, v in _files(work).items() if not k.startswith(".")} == refs["a"]
    finally:
        go.touch()
        _, b_err = b.communicate(timeout=240)
    assert b.returncode == 0, b_err[-2000:]
    assert _files(work) == refs["b"]  # B finished last: its complete output, no temporary left
