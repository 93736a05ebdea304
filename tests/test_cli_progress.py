"""Feedback: the engine's long steps reach stderr — rich bars on a terminal, plain lines elsewhere (CI logs) at
each step's start and end and every LORAPORT_PROGRESS_INTERVAL seconds between — the summary names the size,
the time and the command to run next, `--json` keeps stdout machine-clean, and `-q` / `--quiet` silences it all
on success. The ONNX export case traces a graph (tens of seconds on 2 busy cores): `pytest -m slow`."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loraport import progress
from loraport.console import Reporter, set_quiet
from tests.test_atomic_interrupt import make_big_model

ROOT = Path(__file__).resolve().parent.parent
TENSORS, MB = 24, "56.6 MB"  # make_big_model: 24 fp32 768x768 tensors = 56,623,104 bytes



@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    """The suite runs without progress lines (conftest sets LORAPORT_NO_PROGRESS); they are the subject here."""
    monkeypatch.delenv("LORAPORT_NO_PROGRESS", raising=False)

def _run(*args: str, interval: float = 5.0, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LORAPORT_DEBUG", None)
    env.pop("LORAPORT_NO_PROGRESS", None)  # the suite runs without progress lines (conftest); they are the subject
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["LORAPORT_PROGRESS_INTERVAL"] = str(interval)
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "loraport", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=timeout)  # pipes: not a terminal


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    base, ad = make_big_model(root)
    return root, base, ad


def test_merge_off_a_terminal_prints_progress_lines_summary_and_next_command(model):
    root, base, ad = model
    out = root / "merged"
    r = _run("merge", "--base", base, "--adapter", ad, "--out", out, "--device", "cpu", interval=0.05)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    start = lines.index(f"[merge] start: {TENSORS} tensors, {MB}")
    done = next(i for i, x in enumerate(lines) if re.fullmatch(rf"\[merge\] done: {TENSORS} tensors, {MB} in "
                                                                r"\d+\.\d s", x))
    assert start < done, lines
    for x in lines[start + 1:done]:  # periodic lines (if the merge outlasted the interval) or other steps'
        assert re.fullmatch(rf"\[merge\] \d+/{TENSORS} tensors, [\d.]+ ?[KMG]?B?/{MB}, \d+\.\d s", x) \
            or x.startswith("[hash inputs] "), x
    summary, nxt = lines[-2:]
    assert re.fullmatch(rf"merged 1 adapter\(s\) into {TENSORS} tensor\(s\) → {re.escape(str(out))} \({MB}, "
                        r"\d+\.\ds on cpu\)", summary), summary
    assert nxt == "next: " + shlex.join(["loraport", "validate", str(out), "--base", str(base), "--adapter", str(ad)])
    assert done < len(lines) - 2


def test_quiet_silences_everything_and_json_stays_clean(model):
    root, base, ad = model
    out = root / "quiet"
    r = _run("merge", "--base", base, "--adapter", ad, "--out", out, "--device", "cpu", "--json", "-q",
             interval=0.05)  # the per-command spelling
    assert r.returncode == 0 and r.stderr == "", r.stderr
    rep = json.loads(r.stdout)  # stdout is the report and nothing else
    assert rep["tensors_updated"] == TENSORS and Path(rep["out"]) == out
    r = _run("merge", "--base", base, "--adapter", ad, "--out", root / "no_progress", "--device", "cpu",
             interval=0.05, LORAPORT_NO_PROGRESS="1")  # progress off, the summary kept
    assert r.returncode == 0 and not re.search(r"^\[merge\]", r.stderr, re.M) and "merged 1 adapter" in r.stderr, \
        r.stderr
    r = _run("merge", "--base", base, "--adapter", ad, "--out", root / "quiet_env", "--device", "cpu",
             interval=0.05, LORAPORT_QUIET="1")  # the environment's spelling (CI jobs; the suite itself)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_global_quiet_still_prints_errors_and_resets_between_runs(model):
    from click.testing import CliRunner

    from loraport.cli import main

    root, base, ad = model
    out = root / "quiet_global"
    res = CliRunner().invoke(main, ["--quiet", "merge", "--base", str(base), "--adapter", str(ad), "--out", str(out),
                                    "--device", "cpu"])
    assert res.exit_code == 0 and res.stderr == "" and res.stdout == "", res.stderr
    assert (out / "model.safetensors.index.json").is_file()
    res = CliRunner().invoke(main, ["-q", "merge", "--base", str(base / "missing"), "--adapter", str(ad), "--out",
                                    str(root / "never")])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1, res.stderr
    res = CliRunner().invoke(main, ["merge", "--base", str(base), "--adapter", str(ad), "--out", str(root / "cli"),
                                    "--device", "cpu"])
    assert res.exit_code == 0 and "next: loraport validate" in res.stderr, res.stderr  # quiet was this run's only


# ------------------------------------------------------------------------------ the reporter itself (fast)
def test_plain_reporter_lines_at_start_periodically_and_at_end():
    buf = io.StringIO()
    with progress.reporting(Reporter(stream=buf, interval=0.05, tty=False)), progress.step("cache hit"):
        pass  # ends within the grace period: silent
    time.sleep(0.1)
    assert buf.getvalue() == ""
    with progress.reporting(Reporter(stream=buf, interval=0.05, tty=False)):
        with progress.step("merge", total=3_900_000_000, unit="B", items=40, item_unit="tensors") as advance:
            advance(1_200_000_000, items=12)
            time.sleep(0.4)
            advance(2_700_000_000, items=28)
        with progress.step("trace graph"):
            time.sleep(0.2)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[merge] start: 40 tensors, 3.9 GB"
    assert re.fullmatch(r"\[merge\] 12/40 tensors, 1\.2/3\.9 GB, 0\.\d s", lines[1]), lines
    assert re.fullmatch(r"\[merge\] done: 40 tensors, 3\.9 GB in 0\.\d s", [x for x in lines
                                                                             if x.startswith("[merge] done")][0])
    assert "[trace graph] start" in lines
    assert any(re.fullmatch(r"\[trace graph\] 0\.\d s", x) for x in lines), lines  # a heartbeat, no counts
    assert re.fullmatch(r"\[trace graph\] done in 0\.\d s", lines[-1]), lines


def test_quiet_interrupt_and_no_reporter():
    buf = io.StringIO()
    seen = threading.Event()
    r = Reporter(stream=buf, interval=0.05, tty=False, interrupted=seen)
    with progress.step("nobody watching", total=10) as advance:  # no reporter installed: a no-op
        advance(5)
    set_quiet(True)
    try:
        with progress.reporting(r), progress.step("merge", total=10) as advance:
            advance(10)
    finally:
        set_quiet(False)
    assert buf.getvalue() == ""
    with pytest.raises(KeyboardInterrupt), progress.reporting(r), \
            progress.step("merge", total=10, unit="B") as advance:
        advance(4)
        time.sleep(0.3)
        seen.set()  # a Ctrl-C the work swallowed: the next advance stops the step
        advance(4)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[merge] start: 10 B" and not any("done" in x for x in lines), lines  # it failed


def test_terminal_bars_share_one_display_across_threads(monkeypatch):
    """On a terminal, concurrent steps (the merge and the background hashing) are bars of one rich display
    (rich refuses a second live display) and no plain lines are written."""
    from rich.console import Console

    from loraport import console

    screen = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=screen, force_terminal=True, width=100))
    plain = io.StringIO()
    r = Reporter(stream=plain, interval=0.05, tty=True)
    errors = []

    def hashing():
        try:
            with progress.step("hash inputs", total=100, unit="B", items=2, item_unit="files", reporter=r) as adv:
                for _ in range(2):
                    time.sleep(0.05)
                    adv(50, items=1)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with progress.reporting(r):
        t = threading.Thread(target=hashing)
        t.start()
        with progress.step("merge", total=1000, unit="B", items=10, item_unit="tensors") as advance:
            for _ in range(10):
                time.sleep(0.01)
                advance(100, items=1)
        t.join()
    assert not errors and plain.getvalue() == ""
    assert "merge" in screen.getvalue() and r._bars is None  # drawn, then gone when the last step ended


# ------------------------------------------------------------------------------------------- ONNX (slow)
@pytest.mark.slow
def test_onnx_export_off_a_terminal_shows_the_trace_and_the_validate_command(tmp_path, monkeypatch):
    """Cold export (graph traced: heartbeat lines), then again from the graph cache with -q (silent), then the
    printed next command, run as printed, passes."""
    from tests._onnx_util import ADAPTERS, LLAMA

    monkeypatch.setenv("LORAPORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAPORT_NO_GRAPH_CACHE", raising=False)
    out = tmp_path / "onnx"
    args = ("convert", "--to", "onnx", "--base", LLAMA, "--adapter", ADAPTERS / "llama_plain", "--out", out)
    r = _run(*args, interval=0.5)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "[trace graph] start" in lines  # (the weights of this tiny model take less than the grace period:
    for x in lines:                         # their step is silent, or well-formed)
        if x.startswith("[weights]"):
            assert re.fullmatch(r"\[weights\] (start: 22 tensors|done: 22 tensors, [\d.]+ KB in \d+\.\d s|"
                                r"\d+/22 tensors, [\d.]+ KB, \d+\.\d s)", x), x
    traced = re.search(r"^\[trace graph\] done in (\d+\.\d) s$", r.stderr, re.M)
    assert traced, lines
    if float(traced.group(1)) > 1.0:
        assert any(re.fullmatch(r"\[trace graph\] \d+\.\d s", x) for x in lines), lines  # heartbeats
    assert re.fullmatch(rf"exported llama \(merged, fp32\) → {re.escape(str(out))} \([\d.]+ KB, \d+\.\ds on "
                        r"cpu; graph from capture\)", lines[-2]), lines[-2]
    nxt = lines[-1]
    assert nxt.startswith("next: loraport validate "), nxt
    again = _run(*args, "--overwrite", "-q")
    assert again.returncode == 0 and again.stderr == "", again.stderr
    cmd = shlex.split(nxt[len("next: "):])
    v = _run(*cmd[1:])
    assert v.returncode == 0 and "PASS" in v.stderr, v.stderr[-2000:]
