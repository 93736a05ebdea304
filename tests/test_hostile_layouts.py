"""Hostile bases of today's layouts (MXFP4 gpt-oss, fp8 group / block / ue8m0, ComfyUI-GGUF DiT) and DiT LoRAs
against another family's base, given to `loraport merge`: exit 2, exactly one line on stderr naming what is
wrong, no traceback, no output, the inputs byte-identical, under 5 s and a capped address space.

The cases are data (tests/_hostile_layouts.py), shared with bench/robustness_classes.py, which runs them and a
fuzz of the same bases for the robustness report (bench/results/robustness-new-layouts-2026-12-05.txt).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import _hostile_layouts as L
import _hostile_util as H

CASES = L.cases()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _sampled(cases: list[L.Case]) -> list:
    """Every MXFP4 / fp8 / GGUF case; of the family mismatches one LoRA per (LoRA family, base family) pair in
    the default run (the other ~120 pairs, 0.1 s each, are marked slow: `pytest -m slow -k family`)."""
    seen, out = set(), []
    for c in cases:
        key = c.name.split("_")[0] + ">" + c.name.split(" -> ")[-1].split("-")[0] if c.layout == "family" else c.id
        out.append(c if key not in seen else pytest.param(c, marks=pytest.mark.slow))
        seen.add(key)
    return out


def _digests(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def run_case(case: L.Case, d: Path) -> tuple[int, list[str], str, float]:
    """Merge the case's base through the CLI in-process: (exit code, stderr's lines, problem or "", seconds)."""
    from loraport.cli import main

    base, adapter = case.build(d)
    before = _digests(base, adapter)
    out = L.out_path(base, d)
    t0 = time.perf_counter()
    with H.memory_cap():
        res = CliRunner().invoke(main, ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    dt = time.perf_counter() - t0
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    problem = ""
    if res.exit_code == 0 and case.expect == "any":
        return 0, lines, "", dt
    if res.exit_code != 2 or len(lines) != 1 or "Traceback" in res.output:
        problem = f"exit {res.exit_code}, {len(lines)} lines: {res.stderr[-400:]!r} {res.exception!r}"
    elif not all(any(a in lines[0] for a in s.split("|")) for s in case.say):
        problem = f"the line does not name {case.say}: {lines[0]!r}"
    elif out.exists() or any(p.name.startswith(out.name) and p != out for p in d.iterdir()):
        problem = f"output written: {sorted(p.name for p in d.iterdir())}"
    elif _digests(base, adapter) != before:
        problem = "an input changed"
    return res.exit_code, lines, problem, dt


@pytest.mark.parametrize("case", _sampled(CASES), ids=lambda c: c.id)
def test_hostile_new_layout_base(case, tmp_path):
    code, lines, problem, dt = run_case(case, tmp_path)
    assert not problem, problem
    assert dt < 5, f"{dt:.1f} s"


def test_every_new_family_pair_is_covered():
    """Each new family's LoRAs meet every other family's base and the reverse, kin pairs (Chroma / Flux) aside, and
    pairs where every LoRA of one family is named as the other's modules (LTX-Video's on LTX-2: shapes decide)."""
    from loraport.names import dit

    pairs = {(L._family(lo), L._family(b)) for lo, b in L.family_pairs()}
    for new in L.NEW_FAMILIES:
        others = {f for f in L.FAMILY_NAMES if f != new and not dit.kin(new, f)}
        assert {b for lo, b in pairs if lo == new} == {f for f in others if not L.always_fits(new, f)}, new
        assert {lo for lo, b in pairs if b == new} == {f for f in others if not L.always_fits(f, new)}, new
    assert L.always_fits("ltx_video", "ltx2") and not L.always_fits("ltx2", "ltx_video")


@pytest.mark.slow
def test_hostile_base_real_cli_subprocess(tmp_path):
    """One case per layout through `python -m loraport` itself: exit 2, one line, nothing written."""
    for layout in ("mxfp4", "fp8", "gguf-dit"):
        case = next(c for c in CASES if c.layout == layout and c.expect == "error")
        d = tmp_path / layout
        d.mkdir()
        base, adapter = case.build(d)
        out = L.out_path(base, d)
        r = subprocess.run([sys.executable, "-m", "loraport", "merge", "--base", str(base), "--adapter",
                            str(adapter), "--out", str(out)], capture_output=True, text=True, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (case.id, r.stderr)
        assert not out.exists()


@pytest.mark.parametrize("which", ["base", "adapter", "out"])
def test_symlink_loop_as_base_adapter_or_out_is_one_line(tmp_path, which):
    """Found by the GGUF base fuzz: a single-file base that is a symlink loop ended in an internal error
    (Path.resolve's RuntimeError, exit 1) while the output was checked; an adapter or --out loop as well."""
    from loraport.cli import main

    loop = tmp_path / f"loop-{which}.gguf"
    loop.symlink_to(loop.name)
    base = flux = tmp_path / "flux.gguf"
    L.flux_gguf(flux)
    args = {"base": flux, "adapter": L.FLUX_LORA, "out": tmp_path / "merged.gguf"}
    args[which] = loop
    res = CliRunner().invoke(main, ["merge", *[x for k, v in args.items() for x in (f"--{k}", str(v))]])
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "symlink" in lines[0], res.stderr
    assert not (tmp_path / "merged.gguf").exists() and base.is_file() and loop.is_symlink()


@pytest.mark.parametrize("layout", list(L.SEEDS))
def test_undamaged_seed_merges_and_a_short_fuzz_stays_clean(layout, tmp_path):
    """The fuzzer's seed of each layout merges (so a refusal is the mutation's doing), and 12 seeded mutations
    of it end in a valid merge or a one-line refusal with nothing written and the inputs unchanged (the report
    runs 500 per layout: bench/robustness_report.py --parts basefuzz:<layout>)."""
    import random
    import sys

    sys.path.insert(0, str(L.ROOT / "bench"))
    import robustness_layouts as RL

    from loraport.api import merge

    base, adapter = L.SEEDS[layout](tmp_path)
    out = L.out_path(base, tmp_path)
    merge(base, [str(adapter)], out, hash_cache=False)
    assert out.exists()
    c = RL.fuzz(layout, 12, random.Random(f"test:{layout}"))
    assert c["iterations"] == 12 and c.get("lost", 0) == 0, c
