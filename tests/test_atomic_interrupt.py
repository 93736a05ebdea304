"""Interrupting a real `loraport merge` (SIGKILL, SIGINT, SIGTERM) at observed moments of its run — before
the staged output exists, while shards stream into it, while side files and the manifest are written, after
the rename — must leave either no output or the previous complete output, temporaries that the next run
sweeps, and inputs byte-identical. Also: a full disk (ENOSPC) mid-write and the free-space check.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


LAYERS, DIM, RANK = 12, 768, 8  # 24 fp32 tensors of 2.4 MB: ~57 MB base, a merge of ~0.5-1 s on 2 cores


def _tree_hashes(p: Path) -> dict[str, str]:
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return {f.relative_to(p).as_posix() if p.is_dir() else p.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}


def make_big_model(root: Path) -> tuple[Path, Path]:
    """A llama-named base (two shards + index) and a PEFT LoRA on every q/v projection."""
    from loraport.safetensors_io import save_file

    g = torch.Generator().manual_seed(0)
    base, ad = root / "base", root / "adapter"
    base.mkdir()
    ad.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": DIM,
                                                  "num_hidden_layers": LAYERS, "torch_dtype": "float32"}))
    (base / "tokenizer_config.json").write_text("{}")
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(LAYERS) for m in ("q_proj", "v_proj")]
    half = len(names) // 2
    wm = {}
    for k, chunk in enumerate((names[:half], names[half:]), 1):
        fn = f"model-0000{k}-of-00002.safetensors"
        save_file({n: torch.randn(DIM, DIM, generator=g) for n in chunk}, base / fn, {"format": "pt"})
        wm.update({n: fn for n in chunk})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    lora = {}
    for n in names:
        mod = "base_model.model." + n[: -len(".weight")]
        lora[f"{mod}.lora_A.weight"] = torch.randn(RANK, DIM, generator=g) * 0.01
        lora[f"{mod}.lora_B.weight"] = torch.randn(DIM, RANK, generator=g) * 0.01
    save_file(lora, ad / "adapter_model.safetensors", {"format": "pt"})
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 16,
                                                         "target_modules": ["q_proj", "v_proj"]}))
    return base, ad


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    base, ad = make_big_model(root)
    return root, base, ad


def _stage_bytes(out: Path, pid: int) -> int | None:
    from loraport.outputs import stage_path

    st = stage_path(out, pid=pid)
    if not st.exists():
        return None
    try:
        return sum(f.stat().st_size for f in st.rglob("*") if f.is_file()) if st.is_dir() else st.stat().st_size
    except FileNotFoundError:
        return None


MOMENTS = ("start", "staged", "25%", "75%", "written", "renamed")


def interrupt_run(cmd: list[str], out: Path, moment: str, sig: int, total: int, timeout: float = 120) -> str:
    """Start `cmd`, wait for `moment` (observed on disk), send `sig`; returns what happened."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before = out.stat().st_mtime_ns if out.exists() else None
    t0 = time.monotonic()
    reached = False
    while p.poll() is None and time.monotonic() - t0 < timeout:
        n = _stage_bytes(out, p.pid)
        if moment == "start" and time.monotonic() - t0 > 0.2:
            reached = True
        elif moment.startswith("t=") and time.monotonic() - t0 > float(moment[2:]):
            reached = True
        elif moment == "staged" and n is not None:
            reached = True
        elif moment in ("25%", "75%") and n is not None and n >= total * int(moment[:-1]) / 100:
            reached = True
        elif moment == "written" and n is not None and n >= total:
            reached = True
        elif moment == "renamed" and out.exists() and (out.stat().st_mtime_ns != before):
            reached = True
        if reached:
            p.send_signal(sig)
            break
        time.sleep(0.002)
    p.communicate(timeout=timeout)
    return "interrupted" if reached and p.returncode != 0 else "completed"


def _litter(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.loraport-*"))


def _merge_cmd(base, ad, out, *extra) -> list[str]:
    return [sys.executable, "-m", "loraport", "merge", "--base", str(base), "--adapter", str(ad), "--out", str(out),
            "--device", "cpu", *extra]


# (signal, moment) pairs: fresh output (nothing there before) and replacing a previous complete output
# the default run: 4 points (the full 36-point matrix is the slow test and bench/robustness_report.py)
FRESH = [(signal.SIGKILL, "25%"), (signal.SIGINT, "75%")]
REPLACE = [(signal.SIGKILL, "renamed"), (signal.SIGTERM, "written")]
SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)
FULL = [(s, m) for m in MOMENTS for s in SIGNALS]  # every moment x every signal (slow: ~36 runs)


def run_interruptions(root: Path, base: Path, ad: Path, fresh=FRESH, replace=REPLACE) -> list[dict]:
    """The whole scenario; returns one record per interruption (used by the test and the report script)."""
    from loraport.merging import merge

    inputs_before = {**_tree_hashes(base), **{"adapter/" + k: v for k, v in _tree_hashes(ad).items()}}
    total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    out = root / "merged"
    ref_dir = root / "ref"
    merge(base, [ad], ref_dir, device="cpu")
    ref = _tree_hashes(ref_dir)
    records = []
    # fresh: afterwards there is no output, or the complete one
    for sig, moment in fresh:
        what = interrupt_run(_merge_cmd(base, ad, out), out, moment, sig, total)
        state = _tree_hashes(out) if out.exists() else None
        ok = state is None or _strip(state) == _strip(ref)
        records.append({"phase": "fresh", "signal": sig.name, "moment": moment, "result": what,
                        "output": "none" if state is None else "complete", "ok": ok})
        if out.exists():
            import shutil
            shutil.rmtree(out)
    # next run sweeps every temporary and produces the complete output
    merge(base, [ad], out, device="cpu")
    swept = not _litter(out) and _strip(_tree_hashes(out)) == _strip(ref)
    # replace: a previous complete output exists; a run with another weight is interrupted
    prev = _tree_hashes(out)
    newer_dir = root / "ref_half"
    merge(base, [(ad, 0.5)], newer_dir, device="cpu")
    newer = _tree_hashes(newer_dir)
    for sig, moment in replace:
        what = interrupt_run(_merge_cmd(base, ad, out, "--weight", "0.5", "--overwrite"), out, moment, sig, total)
        state = _tree_hashes(out) if out.exists() else None
        if state is not None and _strip(state) == _strip(newer):
            got = "new complete"
        elif state is not None and _strip(state) == _strip(prev):
            got = "previous complete"
        else:
            got = "BROKEN" if state is not None else "MISSING"
        records.append({"phase": "replace", "signal": sig.name, "moment": moment, "result": what, "output": got,
                        "ok": got in ("new complete", "previous complete")})
        if got == "new complete":  # restore the previous output so the next point tests replacing it again
            import shutil
            shutil.rmtree(out)
            merge(base, [ad], out, device="cpu")
    merge(base, [(ad, 0.5)], out, device="cpu", overwrite=True)
    swept = swept and not _litter(out) and _strip(_tree_hashes(out)) == _strip(newer)
    inputs_after = {**_tree_hashes(base), **{"adapter/" + k: v for k, v in _tree_hashes(ad).items()}}
    for r in records:
        r["swept_next_run"] = swept
        r["inputs_identical"] = inputs_after == inputs_before
    return records


def _strip(h: dict[str, str]) -> dict[str, str]:
    """The manifest names its output folder's inputs and plan, identical between runs; keep it."""
    return h


def test_interrupted_merges_lose_nothing(big):
    root, base, ad = big
    records = run_interruptions(root, base, ad)
    bad = [r for r in records if not (r["ok"] and r["swept_next_run"] and r["inputs_identical"])]
    assert not bad, json.dumps(bad, indent=1)
    assert sum(r["result"] == "interrupted" for r in records) >= len(records) - 2, records


@pytest.mark.slow
def test_interrupted_merges_lose_nothing_full_matrix(big):
    root, base, ad = big
    records = run_interruptions(root, base, ad, fresh=FULL, replace=FULL)
    bad = [r for r in records if not (r["ok"] and r["swept_next_run"] and r["inputs_identical"])]
    assert not bad, json.dumps(bad, indent=1)


def test_killed_between_renames_restores_previous_output(tmp_path):
    """The one window staged_output cannot make atomic (old moved aside, new not yet in place): the next run
    restores the previous output; an old copy left after both renames is discarded, never resurrected."""
    from loraport.outputs import check_output

    out = tmp_path / "o"
    dead = 999999999
    old = tmp_path / f".o.loraport-old-{dead}"
    old.mkdir()
    (old / "f").write_text("previous")
    (tmp_path / f".o.loraport-tmp-{dead}").mkdir()
    with pytest.raises(Exception, match="already exists"):
        check_output(out, [], overwrite=False)
    assert (out / "f").read_text() == "previous" and not _litter(out)
    # after both renames: the new output is in place; a user then deletes it -> the old must not come back
    old.mkdir()
    (old / "f").write_text("stale")
    import shutil
    shutil.rmtree(out)
    check_output(out, [], overwrite=False)
    assert not out.exists() and not _litter(out)


CONVERT_POINTS = [(signal.SIGKILL, "staged"), (signal.SIGKILL, "t=1.5"), (signal.SIGINT, "t=2.0"),
                  (signal.SIGTERM, "staged"), (signal.SIGKILL, "renamed")]


def run_convert_interruptions(root: Path, ad: Path, points=CONVERT_POINTS) -> list[dict]:
    """`loraport convert` (PEFT -> MLX folder) interrupted at observed moments and fixed delays."""
    from loraport.conversion import convert_adapter

    before = _tree_hashes(ad)
    ref = root / "conv_ref"
    convert_adapter(ad, "mlx", ref)
    ref_h = _tree_hashes(ref)
    out = root / "conv"
    records = []
    for sig, moment in points:
        cmd = [sys.executable, "-m", "loraport", "convert", str(ad), "--to", "mlx", "--out", str(out)]
        what = interrupt_run(cmd + (["--overwrite"] if out.exists() else []), out, moment, sig, 1)
        state = _tree_hashes(out) if out.exists() else None
        records.append({"phase": "convert", "signal": sig.name, "moment": moment, "result": what,
                        "output": "none" if state is None else ("complete" if state == ref_h else "BROKEN"),
                        "ok": state is None or state == ref_h})
    import shutil
    if out.exists():
        shutil.rmtree(out)
    convert_adapter(ad, "mlx", out)
    swept = not _litter(out) and _tree_hashes(out) == ref_h
    same = _tree_hashes(ad) == before
    for r in records:
        r["swept_next_run"], r["inputs_identical"] = swept, same
    return records


def test_interrupted_converts_lose_nothing(big):
    root, base, ad = big
    records = run_convert_interruptions(root, ad, CONVERT_POINTS[:1])
    bad = [r for r in records if not (r["ok"] and r["swept_next_run"] and r["inputs_identical"])]
    assert not bad, json.dumps(bad, indent=1)


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    """The sweep removes only temporaries whose writer is gone; a live writer's stage is left alone."""
    from loraport.outputs import sweep_stale

    out = tmp_path / "o"
    live = tmp_path / f".o.loraport-tmp-{os.getpid()}"
    dead = tmp_path / ".o.loraport-tmp-999999999"
    live.mkdir()
    dead.mkdir()
    sweep_stale(out)
    assert live.exists() and not dead.exists()


# ---------------------------------------------------------------------------------------------- full disk
def test_enospc_mid_write_leaves_nothing(big, monkeypatch):
    """A disk that fills up after 10 MB: a one-line "no space left" OutputError, no output, no temporaries."""
    from loraport import safetensors_io
    from loraport.errors import LoraportError
    from loraport.merging import merge

    root, base, ad = big
    out = root / "enospc"
    real_write = safetensors_io.StreamingWriter.write
    budget = {"left": 10 << 20}

    def full_disk(self, name, data):
        n = data.numel() * data.element_size() if isinstance(data, torch.Tensor) else memoryview(data).nbytes
        budget["left"] -= n
        if budget["left"] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real_write(self, name, data)

    monkeypatch.setattr(safetensors_io.StreamingWriter, "write", full_disk)
    with pytest.raises(LoraportError) as ei:
        merge(base, [ad], out, device="cpu")
    e = ei.value
    assert isinstance(e, LoraportError) and "no space left" in str(e), repr(e)
    assert "\n" not in str(e)
    assert not out.exists() and not _litter(out)


def test_enospc_through_cli_is_one_line(big, monkeypatch):
    from click.testing import CliRunner

    from loraport import safetensors_io
    from loraport.cli import main

    root, base, ad = big
    out = root / "enospc_cli"

    def full_disk(self, name, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(safetensors_io.StreamingWriter, "write", full_disk)
    res = CliRunner().invoke(main, ["merge", "--base", str(base), "--adapter", str(ad), "--out", str(out)])
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "no space left" in lines[0], res.stderr
    assert not out.exists() and not _litter(out)


def test_free_space_checked_before_writing(big, monkeypatch):
    """The planned size is compared with the free space before a byte is written."""
    import shutil as sh

    from loraport.errors import OutputError
    from loraport.merging import merge

    root, base, ad = big
    out = root / "nospace"
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(OutputError, match="free"):
        merge(base, [ad], out, device="cpu")
    assert not out.exists() and not _litter(out)


def _can_mount_tmpfs(d: Path) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True)
    return r.returncode == 0


def test_real_full_tmpfs(big, tmp_path, monkeypatch):
    """On a real 8 MB tmpfs (when this machine lets us mount one) with the free-space check bypassed, the
    kernel's ENOSPC mid-write gives a clear error and no partial output."""
    from loraport.errors import LoraportError

    merge_mod = sys.modules["loraport.merging"]

    root, base, ad = big
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(merge_mod, "check_free_space", lambda *a, **k: None)
        with pytest.raises(LoraportError) as ei:
            merge_mod.merge(base, [ad], mnt / "out", device="cpu")
        assert isinstance(ei.value, LoraportError) and "no space left" in str(ei.value), repr(ei.value)
        assert not (mnt / "out").exists() and not _litter(mnt / "out")
        assert sum(f.stat().st_size for f in mnt.rglob("*") if f.is_file()) == 0
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
