"""The input-path policy (loraport/paths.py) against hostile folders, each built here in tmp_path:

* a symlinked ONNX external-data location, a side file symlinked to a secret, a snapshot symlink leaving its
  repo's blobs/: refused with one line naming the file and where it points; no output, the secret's bytes in
  no output file;
* a symlink to /proc/self/pagemap or a FIFO in an input folder: the merge ends promptly (in a child process
  with a timeout), with a clean error or by skipping the stray FIFO; never a hang;
* a base laid out exactly as a Hugging Face cache snapshot (files are symlinks into the repo's blobs/):
  merged with its config, tokenizer and generation config, and the output loads with transformers and
  matches PEFT's own merge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _hostile_classes import MARK, REV, hf_cache, onnx_llama_base, plant
from _hostile_classes import secret as make_secret
from _peft_util import FIXTURES, ROOT, cli

LLAMA = FIXTURES / "bases" / "llama"
ADAPTER = FIXTURES / "adapters" / "llama_plain"


def _assert_refused(res, *names: str) -> str:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, (res.exit_code, res.stderr, res.exception)
    for n in names:
        assert n in lines[0], (n, lines[0])
    assert "refused" in lines[0]
    return lines[0]


def _assert_nothing_written(outs: Path) -> None:
    left = [p for p in outs.rglob("*")] if outs.exists() else []
    assert not left, left
    for p in outs.parent.rglob("*"):  # the secret's bytes are nowhere but in the secret
        if p.is_file() and not p.is_symlink() and "elsewhere" not in p.parts:
            assert MARK[:16] not in p.read_bytes(), p


# ------------------------------------------------------------------------------------------------ ONNX
def test_onnx_external_data_symlinked_out_is_refused(tmp_path):
    ok = onnx_llama_base(tmp_path / "ok")
    res = cli("merge", "--base", ok, "--adapter", ADAPTER, "--out", tmp_path / "ok-merged.onnx")
    assert res.exit_code == 0, res.stderr  # the same model, its data a plain file: bakes

    bad = onnx_llama_base(tmp_path / "bad")
    data = bad.parent / "weights.bin"
    secret = make_secret(tmp_path, data.stat().st_size)  # exactly the size the initializers expect
    data.unlink()
    data.symlink_to(secret)
    outs = tmp_path / "outs"
    outs.mkdir()
    res = cli("merge", "--base", bad, "--adapter", ADAPTER, "--out", outs / "merged.onnx")
    _assert_refused(res, str(data), str(secret))
    _assert_nothing_written(outs)

    from loraport.errors import UnsafeInputError
    from loraport.parity import detect_artifact

    with pytest.raises(UnsafeInputError, match="secret.bin"):  # onnxruntime would follow it: checked first
        detect_artifact(bad)


# ------------------------------------------------------------------------------------------------ side files
def test_side_file_symlinked_out_is_refused(tmp_path):
    """Refused rather than skipped: skipping would silently drop a file the model may need (the very failure
    of a Hugging Face snapshot), and the user should learn that the folder points elsewhere."""
    secret = make_secret(tmp_path)
    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    plant(base / "tokenizer.json", secret)
    outs = tmp_path / "outs"
    outs.mkdir()
    res = cli("merge", "--base", base, "--adapter", ADAPTER, "--out", outs / "merged")
    _assert_refused(res, str(base / "tokenizer.json"), str(secret))
    _assert_nothing_written(outs)

    # an adapter folder is an input folder too (its files are read and hashed into the manifest)
    ad = tmp_path / "adapter"
    shutil.copytree(ADAPTER, ad)
    plant(ad / "README.md", secret)
    res = cli("merge", "--base", LLAMA, "--adapter", ad, "--out", outs / "merged2")
    _assert_refused(res, str(ad / "README.md"), str(secret))
    _assert_nothing_written(outs)


def test_symlinks_inside_the_folder_still_work(tmp_path):
    from loraport.checkpoint import Checkpoint

    base = tmp_path / "base"
    shutil.copytree(LLAMA, base)
    (base / "sub").mkdir()
    (base / "sub" / "tok.json").write_text("{}")
    plant(base / "tokenizer.json", "sub/tok.json")
    (base / "gone.json").symlink_to("missing.json")  # dangling: nothing to read, skipped as before
    (base / "a-link").symlink_to("sub", target_is_directory=True)  # a folder inside, reached twice
    (base / "loop").symlink_to(".", target_is_directory=True)
    ck = Checkpoint.open(base)
    assert {"tokenizer.json", "sub/tok.json", "config.json"} <= set(ck.extra_files)
    assert not {"gone.json", "a-link/tok.json"} & set(ck.extra_files)
    assert not [x for x in ck.extra_files if x.startswith("loop/")]
    ck.close()


# ------------------------------------------------------------------------------------------------ hangs
CHILD = r"""
import json, os, sys, time
from loraport.errors import LoraportError
from loraport.manifest import input_hashes, sha256_file
from loraport.merging import merge

cases = json.loads(sys.argv[1])
res = {}
for name, (kind, a, b) in cases.items():
    t = time.perf_counter()
    try:
        if kind == "merge":
            merge(a, [(b, 1.0)], os.path.join(sys.argv[2], name), hash_cache=False)
        elif kind == "hash-folder":
            res[name + ":files"] = sorted(os.path.basename(k) for k in input_hashes([a]))
        else:
            sha256_file(a)
        res[name] = "ok"
    except LoraportError as e:
        res[name] = "error: " + str(e)
    res[name + ":seconds"] = time.perf_counter() - t
print(json.dumps(res))
"""


def test_pseudo_files_and_fifos_never_hang(tmp_path):
    def base_with(name: str, make) -> str:
        b = tmp_path / name
        shutil.copytree(LLAMA, b)
        make(b)
        return str(b)

    def adapter_with(name: str, make) -> str:
        a = tmp_path / name
        shutil.copytree(ADAPTER, a)
        make(a)
        return str(a)

    pagemap = base_with("b-pagemap", lambda b: (b / "extra.json").symlink_to("/proc/self/pagemap"))
    fifo = base_with("b-fifo", lambda b: os.mkfifo(b / "notes.fifo"))
    fifo_weights = base_with("b-fifo-weights", lambda b: (b / "model.safetensors").unlink()
                             or os.mkfifo(b / "model.safetensors"))
    ad_pagemap = adapter_with("a-pagemap", lambda a: (a / "adapter_config.json").unlink()
                              or (a / "adapter_config.json").symlink_to("/proc/self/pagemap"))
    ad_fifo = adapter_with("a-fifo", lambda a: os.mkfifo(a / "notes"))
    named_fifo = tmp_path / "lora.safetensors"
    os.mkfifo(named_fifo)
    named_proc = tmp_path / "lora2.safetensors"
    named_proc.symlink_to("/proc/self/pagemap")
    cases = {
        "base pagemap": ("merge", pagemap, str(ADAPTER)),
        "base stray fifo": ("merge", fifo, str(ADAPTER)),
        "base fifo weights": ("merge", fifo_weights, str(ADAPTER)),
        "adapter pagemap": ("merge", str(LLAMA), ad_pagemap),
        "adapter stray fifo": ("merge", str(LLAMA), ad_fifo),
        "named fifo": ("merge", str(LLAMA), str(named_fifo)),
        "named pagemap": ("merge", str(LLAMA), str(named_proc)),
        "hash fifo folder": ("hash-folder", fifo, ""),
        "hash fifo": ("hash", str(named_fifo), ""),
    }
    outs = tmp_path / "outs"
    outs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases), str(outs)], capture_output=True,
                           text=True, timeout=120, cwd=str(ROOT), env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("hung on a FIFO or a /proc file")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("base pagemap", "adapter pagemap", "named pagemap"):
        assert res[name].startswith("error: ") and "refused" in res[name] and "/proc/" in res[name], res[name]
    for name in ("base fifo weights", "named fifo", "hash fifo"):
        assert res[name].startswith("error: ") and "refused" in res[name] and "FIFO" in res[name], res[name]
    assert res["base stray fifo"] == "ok" and res["adapter stray fifo"] == "ok", res
    assert (outs / "base stray fifo" / "config.json").is_file()
    assert not (outs / "base stray fifo" / "notes.fifo").exists()  # nothing needs it: skipped, never opened
    assert res["hash fifo folder:files"] == sorted(p.name for p in LLAMA.iterdir())  # all but the FIFO
    assert max(v for k, v in res.items() if k.endswith(":seconds")) < 60
    assert sorted(p.name for p in outs.iterdir()) == ["adapter stray fifo", "base stray fifo"]


# ------------------------------------------------------------------------------------------------ HF cache
@pytest.fixture(scope="module")
def tiny_llama() -> Path:
    """A tiny Llama with its tokenizer, chat template and generation config, as transformers' own
    save_pretrained wrote it (fixtures/make_fixtures.py builds it locally from LlamaConfig)."""
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in LLAMA.iterdir()}
    return LLAMA


def test_hf_cache_snapshot_base_keeps_its_side_files(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "hub"
    snap = hf_cache(tiny_llama, cache)
    # the layout is genuine: transformers/huggingface_hub resolve "org/tiny" from it, offline
    from huggingface_hub import scan_cache_dir

    repo = next(r for r in scan_cache_dir(cache).repos if r.repo_id == "org/tiny")
    assert {f.file_name for rev in repo.revisions for f in rev.files} == {p.name for p in tiny_llama.iterdir()}
    base = AutoModelForCausalLM.from_pretrained("org/tiny", cache_dir=cache, local_files_only=True).eval()
    assert all(p.is_symlink() for p in snap.iterdir())

    out = tmp_path / "merged"
    res = cli("merge", "--base", snap, "--adapter", ADAPTER, "--out", out)
    assert res.exit_code == 0, res.stderr
    side = {p.name for p in tiny_llama.iterdir()} - {"model.safetensors"}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= side
    for name in side:
        f = out / name
        assert f.is_file() and not f.is_symlink(), name
        assert f.read_bytes() == (tiny_llama / name).read_bytes() or name == "config.json", name
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.generation_config.max_new_tokens == base.generation_config.max_new_tokens == 8  # from the file
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("w5 w9 w17 w40").input_ids])
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(ADAPTER)).merge_and_unload()(ids).logits
        got = merged(ids).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_hf_cache_snapshot_symlink_leaving_its_blobs_is_refused(tmp_path, tiny_llama):
    cache = tmp_path / "hub"
    snap = hf_cache(tiny_llama, cache)
    other = hf_cache(tiny_llama, cache, "org/other")  # another repo's blobs: not this snapshot's store
    tok = snap / "tokenizer.json"
    target = (other / "tokenizer.json").resolve()
    tok.unlink()
    tok.symlink_to(os.path.relpath(target, tok.parent))
    outs = tmp_path / "outs"
    outs.mkdir()
    res = cli("merge", "--base", snap, "--adapter", ADAPTER, "--out", outs / "merged")
    line = _assert_refused(res, str(tok), str(target))
    assert "blobs/ store" in line
    assert not list(outs.iterdir())

    secret = make_secret(tmp_path)
    tok.unlink()
    tok.symlink_to(secret)
    res = cli("merge", "--base", snap, "--adapter", ADAPTER, "--out", outs / "merged")
    _assert_refused(res, str(tok), str(secret))
    _assert_nothing_written(outs)


def test_roots_follow_exactly_the_snapshot_repo(tmp_path):
    from loraport.paths import roots

    snap = tmp_path / "hub" / "models--org--x" / "snapshots" / REV
    (snap / "unet").mkdir(parents=True)
    blobs = str((tmp_path / "hub" / "models--org--x" / "blobs").resolve())
    assert roots(snap) == (str(snap.resolve()), blobs)
    assert roots(snap / "unet") == (str((snap / "unet").resolve()), blobs)
    plain = tmp_path / "snapshots" / "x"
    plain.mkdir(parents=True)
    assert roots(plain) == (str(plain.resolve()),)  # not under models--*/: no blobs/ allowance
