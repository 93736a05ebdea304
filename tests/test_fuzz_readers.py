"""Fuzzing every reader: mutate valid fixtures (bytes, safetensors header fields, JSON config values) and
require either a clean LoraportError or a valid result (read, planned against the base, merged) — never
another exception, a hang, or an allocation beyond a capped address space.

Default: a bounded, deterministic run (1000 examples split across the readers, at least 100 each).
By hand:  LORAPORT_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_readers.py   (random, split across readers)
A crashing input is copied to $LORAPORT_FUZZ_SAVE (default /tmp/loraport-fuzz-failures); commit it as a
regression under fixtures/regressions/<name>/ with a case.json (see test_regressions_stay_fixed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _hostile_util as H
from loraport.errors import LoraportError

BY_FORMAT = H.seeds_by_format()
FORMATS = sorted(BY_FORMAT)
TOTAL = int(os.environ.get("LORAPORT_FUZZ_EXAMPLES", "0"))
DEFAULT_TOTAL = 1000  # the bounded default run: ~25 s on 2 cores, split evenly, at least 100 per reader
PER_FORMAT = max(TOTAL // max(len(FORMATS), 1), 1) if TOTAL else max(DEFAULT_TOTAL // max(len(FORMATS), 1), 100)
LONG = TOTAL > 0
SAVE = Path(os.environ.get("LORAPORT_FUZZ_SAVE", "/tmp/loraport-fuzz-failures"))


def _save_failure(fmt: str, copy: Path, seed: H.Seed, desc: str, err: BaseException) -> Path:
    files = sorted(copy.rglob("*")) if copy.is_dir() else [copy]  # never read through a planted symlink/FIFO
    blob = b"".join(f.read_bytes() for f in files if f.is_file() and not f.is_symlink())
    d = SAVE / f"{fmt}-{hashlib.sha256(blob).hexdigest()[:12]}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    H.copy_input(copy, d / copy.name)
    (d / "case.json").write_text(json.dumps({
        "format": fmt, "adapter": copy.name, "seed": str(seed.path.relative_to(H.ROOT)),
        "base": str(seed.base.relative_to(H.ROOT)) if seed.base else None, "mutation": desc,
        "error": f"{type(err).__name__}: {str(err)[:300]}",
    }, indent=1))
    return d


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_reader(fmt):
    seeds = BY_FORMAT[fmt]
    stats = {"ok": 0, "error": 0}

    @settings(max_examples=PER_FORMAT, deadline=None, database=None, derandomize=not LONG,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(data=st.data())
    def run(data):
        ch = H.Chooser(data=data)
        seed = ch.pick(seeds)
        with tempfile.TemporaryDirectory(prefix="lpfuzz-") as td:
            copy = H.copy_seed(seed, Path(td), "fuzzed")
            descs = [H.random_mutation(copy, ch) for _ in range(ch.integer(1, 3))]
            if ch.integer(0, 4) == 0:  # symlinks out, /proc, FIFOs, devices (the input-path policy)
                descs.append(H.path_mutation(copy, ch))
            try:
                with H.memory_cap(), H.time_limit(30):
                    r = H.exercise(copy, seed)
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                where = _save_failure(fmt, copy, seed, " + ".join(descs), e)
                raise AssertionError(f"{seed.label} after {descs}: {type(e).__name__}: {str(e)[:300]} "
                                     f"(input saved to {where})\n{traceback.format_exc()[-2000:]}") from None
            if isinstance(r, LoraportError):
                assert H.clean_message(r), f"{seed.label} after {descs}: multi-line message {str(r)[:300]!r}"
                stats["error"] += 1
            elif copy.is_dir() and descs[-1].endswith("secret outside"):
                raise AssertionError(f"{seed.label} after {descs}: a symlink out of the folder was read")
            else:
                stats["ok"] += 1

    run()
    assert stats["ok"] + stats["error"] >= 1


def _regressions() -> list[Path]:
    return sorted(p for p in H.REGRESSIONS.glob("*/case.json")) if H.REGRESSIONS.is_dir() else []


def _replay_in_subprocess(case: Path, spec: dict, timeout: float = 20) -> str:
    """'hang', 'crash' or 'clean' for an input replayed in a child process (a regex or C loop that never
    returns cannot be interrupted in-process)."""
    import subprocess
    import sys

    src = case.parent / spec["adapter"]
    base = str(H.ROOT / spec["base"]) if spec.get("base") else None
    code = "\n".join([
        "import shutil, sys, tempfile",
        "from pathlib import Path",
        "sys.path.insert(0, 'tests')",
        "import _hostile_util as H",
        f"src, fmt, base = Path({str(src)!r}), {spec['format']!r}, {base!r}",
        "copy = Path(tempfile.mkdtemp()) / src.name",
        "(shutil.copytree if src.is_dir() else shutil.copy2)(src, copy)",
        "r = H.exercise(copy, H.Seed(src, fmt, Path(base) if base else None))",
        "shutil.rmtree(copy.parent, ignore_errors=True)",
        "print('clean' if r == 'ok' or H.clean_message(r) else 'crash')",
    ])
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=H.ROOT, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang"
    return "clean" if r.returncode == 0 and r.stdout.strip().endswith("clean") else "crash"


def _fixed(case: Path, spec: dict) -> bool:
    if spec.get("hang"):
        return _replay_in_subprocess(case, spec, timeout=8) == "clean"
    src = case.parent / spec["adapter"]
    seed = H.Seed(src, spec["format"], H.ROOT / spec["base"] if spec.get("base") else None)
    with tempfile.TemporaryDirectory() as td:
        copy = Path(td) / src.name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, copy)
        try:
            r = H.exercise(copy, seed)
        except Exception:  # noqa: BLE001 - still crashing
            return False
    return r == "ok" or H.clean_message(r)


@pytest.mark.parametrize("case", _regressions(), ids=lambda p: p.parent.name)
def test_regressions_stay_fixed(case, tmp_path):
    """Inputs that once crashed a reader (found by fuzzing): now a clean error or a valid result."""
    spec = json.loads(case.read_text())
    if spec.get("known_failure"):  # reported to the reader's owner; flips to a failure once fixed
        if not _fixed(case, spec):
            pytest.xfail(f"known, reported: {spec['known_failure']}")
        pytest.fail(f"{case.parent.name} is fixed: drop known_failure from its case.json")
    if spec.get("hang"):
        assert _replay_in_subprocess(case, spec, timeout=60) == "clean"
        return
    src = case.parent / spec["adapter"]
    base = H.ROOT / spec["base"] if spec.get("base") else None
    seed = H.Seed(src, spec["format"], base)
    copy = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, copy)
    with H.memory_cap(), H.time_limit(60):
        r = H.exercise(copy, seed)
    if spec.get("expect") == "error":
        assert isinstance(r, LoraportError), r
    if isinstance(r, LoraportError):
        assert H.clean_message(r)


def test_harness_catches_big_allocations_and_hangs():
    """The fuzz harness's guards work: an allocation past the cap fails, a Python-level hang is cut off."""
    import torch

    with pytest.raises((MemoryError, RuntimeError)):
        with H.memory_cap(256 << 20):
            torch.empty(1 << 31, dtype=torch.uint8).fill_(1)
    with pytest.raises(H.Hang):
        with H.time_limit(0.2):
            while True:
                pass


BASES = sorted({s.base for s in H.seeds() if s.base is not None and s.base.is_dir()
                and sum(f.stat().st_size for f in s.base.rglob("*.safetensors")) < 2_000_000}, key=str)


@pytest.mark.skipif(not BASES, reason="no fixture base")
def test_fuzz_base_checkpoint():
    """The base is untrusted too: mutated base folders (weights, index, config) open and stream cleanly or
    fail with a LoraportError."""
    from loraport.checkpoint import Checkpoint

    @settings(max_examples=max(PER_FORMAT, 100), deadline=None, database=None, derandomize=not LONG,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        ch = H.Chooser(data=data)
        base = ch.pick(BASES)
        with tempfile.TemporaryDirectory(prefix="lpfuzzb-") as td:
            copy = Path(td) / "base"
            shutil.copytree(base, copy)
            descs = [H.random_mutation(copy, ch) for _ in range(ch.integer(1, 2))]
            descs += [H.path_mutation(copy, ch)] if ch.integer(0, 4) == 0 else []
            try:
                with H.memory_cap(), H.time_limit(30):
                    ck = Checkpoint.open(copy)
                    for n in ck.names():
                        ck.get(n).float().sum()
                        ck.layer_hint(n)
                    ck.close()
            except LoraportError as e:
                assert H.clean_message(e), f"{base.name} after {descs}: {str(e)[:300]!r}"
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise AssertionError(f"{base.name} after {descs}: {type(e).__name__}: {str(e)[:300]}") from None

    run()
