"""Hub repo ids as inputs (loraport/hub.py): `org/name[@revision]` resolves through huggingface_hub's own
offline cache lookup, in a Hugging Face cache laid out as huggingface_hub lays it out (blobs/, refs/main,
snapshots/<commit>/ with files as symlinks into blobs/) and checked with huggingface_hub's scan_cache_dir;
nothing is downloaded; a repo that is not cached gets one line saying how to fetch it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import loraport
from loraport import hub
from loraport.errors import BadInputError
from tests._hostile_classes import hf_cache as hf_cache_layout
from tests._peft_util import cli, fx

BASE = fx("bases", "llama")
AD1 = fx("adapters", "llama_plain")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Put the files of `src` into `cache` as huggingface_hub's downloads leave them (blobs, snapshot symlinks,
    refs)."""
    return hf_cache_layout(src, cache, repo_id, commit, ref)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    cache_repo(cache, "tiny-org/tiny-llama", BASE)
    cache_repo(cache, "tiny-org/tiny-lora", AD1)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_the_fake_cache_is_what_huggingface_hub_reads(hf_cache):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_cache)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"tiny-org/tiny-llama", "tiny-org/tiny-lora"}
    rev = next(iter(repos["tiny-org/tiny-llama"].revisions))
    assert rev.commit_hash == COMMIT and "main" in rev.refs
    assert {f.file_name for f in rev.files} == {p.name for p in BASE.iterdir()}


def test_merge_from_repo_ids_in_the_cache(hf_cache, tmp_path):
    r = cli("merge", "--base", "tiny-org/tiny-llama", "--adapter", "tiny-org/tiny-lora", "--out", tmp_path / "m",
            "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert Path(rep["base"]).resolve() == (hf_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT).resolve()
    out = tmp_path / "m"
    # the snapshot's symlinked side files are carried over as files, so transformers loads the output
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert loraport.verify(out).ok
    # the cache is unchanged (inputs are never modified)
    assert all(p.is_symlink() for p in (hf_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT).iterdir())


def test_api_accepts_repo_ids_and_revisions(hf_cache, tmp_path):
    res = loraport.merge(f"tiny-org/tiny-llama@{COMMIT}", ["tiny-org/tiny-lora", ("tiny-org/tiny-lora", 0.5)],
                         tmp_path / "m")
    assert [a["weight"] for a in res.adapters] == [1.0, 0.5]
    assert loraport.inspect("tiny-org/tiny-lora").format == "peft"


def test_hf_home_is_respected(hf_cache, tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    home.mkdir()
    shutil.move(str(hf_cache), str(home / "hub"))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub.resolve("tiny-org/tiny-llama", "base").resolve() == \
        (home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT).resolve()


def test_a_repo_not_in_the_cache_says_how_to_fetch_it(hf_cache, tmp_path):
    r = cli("merge", "--base", "meta-llama/Llama-3.2-1B", "--adapter", AD1, "--out", tmp_path / "m")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download meta-llama/Llama-3.2-1B --local-dir ./Llama-3.2-1B" in lines[0]
    assert "Traceback" not in r.output and not (tmp_path / "m").exists()
    with pytest.raises(BadInputError, match=r"--revision v9 --local-dir ./tiny-lora"):
        loraport.merge(BASE, ["tiny-org/tiny-lora@v9"], tmp_path / "m")  # cached, but not that revision
    with pytest.raises(BadInputError, match="not in"):
        loraport.validate(tmp_path / "nothing", "other-org/model")


def test_an_existing_local_path_wins_over_the_cache(hf_cache, tmp_path):
    local = tmp_path / "tiny-org" / "tiny-llama"
    shutil.copytree(BASE, local)
    assert hub.resolve("tiny-org/tiny-llama", "base") == Path("tiny-org/tiny-llama")
    assert hub.parse_repo_id("./x/y") is None and hub.parse_repo_id("out/model.safetensors") is None
    assert hub.parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")


def test_a_symlink_out_of_the_snapshot_is_refused(hf_cache, tmp_path):
    """Only links into the repo's own blobs/ count as snapshot files: one pointing elsewhere is refused (the
    input-path policy), and nothing is written."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    snap = hf_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    (snap / "notes.txt").symlink_to(secret)
    with pytest.raises(loraport.LoraportError, match="notes.txt.*outside the input folder"):
        loraport.merge("tiny-org/tiny-llama", ["tiny-org/tiny-lora"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_batch_jobs_take_repo_ids(hf_cache, tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"adapter": "tiny-org/tiny-lora", "out": "j1"},
                                {"adapter": ["tiny-org/tiny-lora", str(AD1)], "weight": [0.5, 0.5], "out": "j2"}]))
    r = cli("merge", "--base", "tiny-org/tiny-llama", "--jobs", jobs, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] == 2 and (tmp_path / "j1" / "config.json").is_file()
