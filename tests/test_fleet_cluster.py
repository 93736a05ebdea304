"""Issue #20's proof on a real cluster: a `dask scheduler` and two `dask worker` processes (the venv's dask CLI,
every socket on 127.0.0.1, stopped by pid), a mixed jobs file of 26 jobs with bad inputs, a worker killed with
SIGKILL in the middle of a merge. Every good output equals the local executor's byte for byte, every bad job
has its one error line, the killed job is retried and finishes, a rerun skips every completed job.

Slow (3-5 minutes on 2 shared cores: worker start-up imports torch, an ONNX export runs twice):
    python -m pytest -m slow tests/test_fleet_cluster.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_fleet_dask import AD, LLAMA, QWEN, tree

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def big_model(root: Path) -> tuple[Path, Path]:
    """A 100 MB llama and a PEFT LoRA on every projection, made with transformers and peft: its merge takes long
    enough (~2 s) to kill the worker in the middle of it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=512)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(root / "big_base")
    p = get_peft_model(m, LoraConfig(r=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    p.save_pretrained(root / "big_adapter")
    return root / "big_base", root / "big_adapter"


def jobs(folder: Path, big_base: Path, big_ad: Path) -> tuple[list[dict], set[str], dict[str, str]]:
    trunc = folder / "truncated"
    trunc.mkdir()
    src = AD / "llama_plain"
    (trunc / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    (trunc / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes()[:100])
    js = [{"adapter": str(big_ad), "base": str(big_base), "out": "big"}]
    for i, w in enumerate((0.25, 0.5, 1.0, 1.5, 2.0, -1.0)):
        js.append({"adapter": str(AD / "llama_plain"), "weight": w, "out": f"plain_{i}"})
    for i, w in enumerate((0.5, 1.0, 3.0)):
        js.append({"adapter": str(AD / "llama_plain2"), "weight": w, "out": f"plain2_{i}"})
    js += [
        {"adapter": [str(AD / "llama_plain"), str(AD / "llama_plain2")], "weight": [0.7, 0.3], "out": "pair"},
        {"adapter": str(AD / "llama_dora"), "out": "dora"},
        {"adapter": str(AD / "qwen2_plain"), "base": str(QWEN), "out": "qwen_1"},
        {"adapter": str(AD / "qwen2_plain"), "base": str(QWEN), "weight": 0.5, "out": "qwen_2"},
        {"adapter": str(AD / "qwen2_dora_bf16"), "base": str(QWEN), "out": "qwen_dora"},
        {"kind": "convert", "adapter": str(AD / "llama_plain"), "to": "mlx", "base": str(LLAMA), "out": "mlx"},
        {"kind": "convert", "adapter": str(AD / "llama_plain"), "to": "torchtune", "base": str(LLAMA),
         "out": "tt"},
        {"kind": "convert", "adapter": str(AD / "llama_plain"), "to": "onnx", "out": "onnx"},
        {"adapter": "mlx", "weight": 0.5, "out": "from_mlx"},
        {"kind": "validate", "artifact": "plain_2", "name": "check_plain_2"},
        {"kind": "validate", "artifact": "plain_2", "adapter": str(AD / "llama_plain2"), "name": "check_wrong"},
        {"adapter": str(folder / "nowhere"), "out": "from_nowhere"},
        {"adapter": "truncated", "out": "from_truncated"},
        {"adapter": str(AD / "gpt2_conv1d"), "out": "wrong_base"},
        {"kind": "convert", "adapter": str(AD / "llama_plain"), "to": "nosuchformat", "out": "bad_format"},
        {"adapter": "from_truncated", "out": "after_bad"},
    ]
    bad = {"from_nowhere": "nowhere", "from_truncated": "truncated", "wrong_base": "", "bad_format": "nosuchformat",
           "after_bad": "not run", "check_wrong": "validation failed"}
    good = {j.get("out") for j in js if j.get("out") and j["out"] not in bad}
    return js, good, bad


class Cluster:
    """`dask scheduler` + two `dask worker`s (each a nanny and its worker), all bound to 127.0.0.1."""

    def __init__(self, folder: Path):
        self.file = folder / "scheduler.json"
        dask = str(Path(sys.executable).parent / "dask")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
        log = open(folder / "cluster.log", "w")  # noqa: SIM115 - closed in stop()
        self.log = log
        self.procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                        "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(self.file)],
                                       env=env, stdout=log, stderr=log)]
        deadline = time.time() + 60
        while not self.file.is_file() and time.time() < deadline:
            time.sleep(0.2)
        self.address = json.loads(self.file.read_text())["address"]
        for _ in range(2):
            self.procs.append(subprocess.Popen(
                [dask, "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--memory-limit", "0",
                 "--dashboard-address", "127.0.0.1:0"], env=env, stdout=log, stderr=log))

    def listening(self) -> list[tuple[str, int]]:
        import psutil

        out = []
        for p in self.procs:
            for q in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]:
                out += [(c.laddr.ip, c.laddr.port) for c in q.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN]
        return out

    def stop(self):
        for p in reversed(self.procs):  # by pid: workers (and their nannies' children) first
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()


def killer(folder: Path, name: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the worker process writing `name`: its pid is in the name of its staged output."""
    from loraport.outputs import TMP_TAG, owner

    prefix = f".{name}{TMP_TAG}"
    while not stop.is_set() and not killed:
        for p in folder.iterdir():
            o = owner(p.name, prefix)
            if o is not None:
                os.kill(o[0], signal.SIGKILL)
                killed.append(o[0])
                return
        time.sleep(0.005)


def cli(folder: Path, *args: str) -> tuple[int, list[dict], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "loraport", "merge", "--base", str(LLAMA), "--jobs",
                        str(folder / "jobs.json"), "--device", "cpu", "--jsonl", *args], capture_output=True,
                       text=True, env=env, timeout=900)
    return p.returncode, [json.loads(x) for x in p.stdout.splitlines()], p.stderr


def test_mixed_jobs_on_a_real_cluster_with_a_worker_killed_mid_job(tmp_path):
    from loraport.batch import jobs_from_file, run_jobs
    from loraport.executors import LocalExecutor

    big_base, big_ad = big_model(tmp_path)
    w, ref = tmp_path / "w", tmp_path / "local"
    w.mkdir()
    ref.mkdir()
    js, good, bad = jobs(w, big_base, big_ad)
    assert len(js) >= 20
    (w / "jobs.json").write_text(json.dumps(js))
    local = {r.name: r.as_dict() for r in run_jobs(str(LLAMA), jobs_from_file(w / "jobs.json", str(LLAMA)),
                                                   executor=LocalExecutor(), device="cpu")}
    for n in good:  # set aside; the cluster writes the same paths (outputs record their inputs' paths)
        shutil.move(w / n, ref / n)
    cluster = Cluster(tmp_path)
    try:
        killed: list[int] = []
        stop = threading.Event()
        t = threading.Thread(target=killer, args=(w, "big", killed, stop), daemon=True)
        t.start()
        rc, recs, err = cli(w, "--scheduler", cluster.address)
        stop.set()
        listening = cluster.listening()
        assert listening and all(ip == "127.0.0.1" for ip, _ in listening), listening
        by = {r.get("name"): r for r in recs[:-1]}
        assert rc == 1 and len(recs) == len(js) + 1 and "Traceback" not in err, err[-3000:]
        assert killed, "the big job's worker was never seen writing"
        assert by["big"]["status"] == "ok", by["big"]
        assert by["big"]["worker"].split("@")[0] != str(killed[0]), "the killed job was not run again elsewhere"
        for n in good:
            assert by[n]["status"] == "ok", (n, by[n])
            assert by[n]["sha256"] == local[n]["sha256"] and tree(w / n) == tree(ref / n), f"{n}: bytes differ"
        assert by["check_plain_2"]["status"] == "ok" and by["check_plain_2"]["passed"] is True
        for n, words in bad.items():
            assert by[n]["status"] == "failed" and words in by[n]["error"] and "\n" not in by[n]["error"], by[n]
            assert by[n]["error"] == local[n]["error"] or n == "after_bad"
            assert not (w / n).exists()
        assert recs[-1]["summary"]["failed"] == len(bad)
        assert len({r["worker"] for r in recs[:-1] if r.get("worker")}) >= 2  # both workers (and the restarted) ran
        assert not [p for p in w.iterdir() if ".loraport-tmp-" in p.name]  # the killed run's stage was swept

        rc, again, err = cli(w, "--scheduler", cluster.address)
        by2 = {r.get("name"): r for r in again[:-1]}
        assert rc == 1, err[-2000:]
        assert {n for n, r in by2.items() if r["status"] == "skipped"} == good
        assert all(by2[n]["sha256"] == by[n]["sha256"] for n in good)
        assert by2["check_plain_2"]["status"] == "ok"  # a validation has no output: it is the check, rerun
        assert {n for n, r in by2.items() if r["status"] == "failed"} == set(bad)
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs)


def test_ctrl_c_cancels_outstanding_jobs_and_leaves_no_partial_output(tmp_path):
    """SIGINT to `loraport merge --jobs --executor dask` while a worker writes: one line, exit 130, the
    cluster's processes gone, every output either complete (it verifies) or absent, no temporary left."""
    import psutil

    from loraport.outputs import TMP_TAG

    big_base, big_ad = big_model(tmp_path)
    w = tmp_path / "w"
    w.mkdir()
    js = [{"adapter": str(big_ad), "base": str(big_base), "weight": 0.1 * (i + 1), "out": f"big{i}"}
          for i in range(6)]
    (w / "jobs.json").write_text(json.dumps(js))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "loraport", "merge", "--jobs", str(w / "jobs.json"), "--device",
                          "cpu", "--executor", "dask", "--workers", "2"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline, children = time.time() + 300, []
    while time.time() < deadline and not any(TMP_TAG in q.name for q in w.iterdir()):
        time.sleep(0.005)
    children = psutil.Process(p.pid).children(recursive=True)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert children, "no job ever started writing"
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive
    from loraport.manifest import verify

    done = [j["out"] for j in js if (w / j["out"]).exists()]
    assert len(done) < len(js)  # outstanding jobs were cancelled
    assert all(verify(w / n)["ok"] for n in done)
    assert not [q.name for q in w.iterdir() if TMP_TAG in q.name]
