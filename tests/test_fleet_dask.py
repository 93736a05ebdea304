"""Batch executors (issue #20): the local one and Dask's run the same jobs file to the same records and the same
bytes; a rerun skips what verifies; bad jobs are error lines, never a stop. The default tests use a LocalCluster
with worker threads (quick to start); tests/test_fleet_cluster.py (slow) runs a real scheduler and two worker
processes and kills one mid-job."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("distributed")

FX = Path(__file__).resolve().parents[1] / "fixtures" / "peft"
LLAMA, QWEN = FX / "bases" / "llama", FX / "bases" / "qwen2_bf16"
AD = FX / "adapters"


def tree(p: Path) -> dict[str, str]:
    """Every file of an output (a folder's, or a file and its sibling manifest), by name: sha256."""
    files = [p] + [p.with_name(p.name + ".manifest.json")] if p.is_file() else sorted(p.rglob("*"))
    return {f.name if p.is_file() else f.relative_to(p).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files if f.is_file()}


def mixed_jobs(folder: Path) -> list[dict]:
    """Good merges on two bases, a conversion, a job reading another's output, and bad ones of several kinds
    (each made here): a missing adapter, a truncated one, one planned against the wrong base."""
    trunc = folder / "truncated"
    trunc.mkdir()
    (trunc / "adapter_config.json").write_bytes((AD / "llama_plain" / "adapter_config.json").read_bytes())
    (trunc / "adapter_model.safetensors").write_bytes((AD / "llama_plain" / "adapter_model.safetensors")
                                                      .read_bytes()[:100])
    return [
        {"adapter": str(AD / "llama_plain"), "out": "plain"},
        {"adapter": [str(AD / "llama_plain"), str(AD / "llama_plain2")], "weight": [0.5, -0.25], "out": "pair"},
        {"adapter": str(AD / "qwen2_plain"), "base": str(QWEN), "out": "qwen"},
        {"kind": "convert", "adapter": str(AD / "llama_plain"), "to": "mlx", "base": str(LLAMA), "out": "mlx"},
        {"adapter": "mlx", "weight": 2.0, "out": "from_mlx"},  # reads the conversion's output: runs after it
        {"adapter": str(folder / "missing"), "out": "from_missing"},
        {"adapter": "truncated", "out": "bad_trunc"},
        {"adapter": str(AD / "gpt2_conv1d"), "out": "wrong_base"},
        {"adapter": "bad_trunc", "out": "after_bad"},  # its input job fails: reported, not run
    ]


GOOD = {"plain", "pair", "qwen", "mlx", "from_mlx"}
BAD = {"from_missing": "missing", "bad_trunc": "truncated", "wrong_base": "", "after_bad": "not run"}


def run(folder: Path, executor, **options):
    from loraport.batch import jobs_from_file, run_jobs

    jobs = jobs_from_file(folder / "jobs.json", str(LLAMA))
    seen = []
    res = run_jobs(str(LLAMA), jobs, on_result=seen.append, executor=executor, device="cpu", **options)
    assert sorted(r.name for r in seen) == sorted(r.name for r in res)  # each record streamed once
    return [r.as_dict() for r in res]


@pytest.fixture(scope="module")
def dask_executor():
    from loraport.executors import DaskExecutor

    return DaskExecutor(n_workers=2, processes=False)


def test_dask_and_local_give_the_same_records_and_bytes(tmp_path, dask_executor):
    """Run locally, move the outputs aside, run on Dask in the same folder (outputs record their inputs' paths)."""
    import shutil

    from loraport.executors import LocalExecutor

    dd, ld = tmp_path / "w", tmp_path / "local"
    dd.mkdir()
    ld.mkdir()
    (dd / "jobs.json").write_text(json.dumps(mixed_jobs(dd)))
    local = run(dd, LocalExecutor())
    for r in local:
        if r["ok"]:
            shutil.move(dd / r["name"], ld / r["name"])
    dask = run(dd, dask_executor)
    assert [r["name"] for r in local] == [r["name"] for r in dask]  # job order, whatever finished first
    for lr, dr in zip(local, dask):
        assert set(lr) == set(dr), lr["name"]  # one record shape
        assert (lr["status"], lr["ok"], lr.get("exit_code")) == (dr["status"], dr["ok"], dr.get("exit_code"))
        assert lr["sha256"] == dr["sha256"], lr["name"]
        if lr["name"] in GOOD:
            assert dr["status"] == "ok" and dr["sha256"]
            assert tree(dd / dr["name"]) == tree(ld / lr["name"]), f"{lr['name']}: bytes differ"
        else:
            assert dr["status"] == "failed" and "\n" not in dr["error"] and BAD[dr["name"]] in dr["error"]
            assert not (dd / dr["name"]).exists()
    assert {r["name"] for r in dask if r["ok"]} == GOOD
    from loraport.job_runner import output_digest

    assert all(r["sha256"] == output_digest(dd / r["name"]) for r in dask if r["ok"])
    assert not [p for p in dd.rglob("*") if ".loraport-tmp-" in p.name]


def test_rerun_skips_what_verifies_and_redoes_what_does_not(tmp_path, dask_executor):
    d = tmp_path / "w"
    d.mkdir()
    (d / "jobs.json").write_text(json.dumps(mixed_jobs(d)))
    first = {r["name"]: r for r in run(d, dask_executor)}
    # a crash's aftermath: one output damaged after it was written, one removed
    w = next((d / "pair").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    import shutil

    shutil.rmtree(d / "plain")
    second = {r["name"]: r for r in run(d, dask_executor)}
    assert second["plain"]["status"] == "ok" and second["plain"]["sha256"] == first["plain"]["sha256"]
    assert second["pair"]["status"] == "failed" and "already exists" in second["pair"]["error"]  # never clobbered
    for n in ("qwen", "mlx", "from_mlx"):
        assert second[n]["status"] == "skipped" and second[n]["sha256"] == first[n]["sha256"], n
    # same output path, another job (another weight): not the job that made it, so not skipped
    jobs = json.loads((d / "jobs.json").read_text())
    jobs[4]["weight"] = 3.0
    (d / "jobs.json").write_text(json.dumps(jobs))
    third = {r["name"]: r for r in run(d, dask_executor)}
    assert third["from_mlx"]["status"] == "failed" and "already exists" in third["from_mlx"]["error"]
    assert third["mlx"]["status"] == "skipped"
    fourth = {r["name"]: r for r in run(d, dask_executor, overwrite=True)}
    assert fourth["from_mlx"]["status"] == "ok" and fourth["from_mlx"]["sha256"] != first["from_mlx"]["sha256"]


def test_cli_jsonl_stream_and_summary(tmp_path):
    from click.testing import CliRunner

    from loraport.cli import main

    d = tmp_path / "c"
    d.mkdir()
    jobs = mixed_jobs(d)[:3] + [{"adapter": str(d / "nope"), "out": "nope"}]
    (d / "jobs.json").write_text(json.dumps(jobs))
    r = CliRunner().invoke(main, ["merge", "--base", str(LLAMA), "--jobs", str(d / "jobs.json"), "--device", "cpu",
                                  "--jsonl"])
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.exit_code == 1, r.stderr
    assert [x["name"] for x in lines[:-1]] == ["plain", "pair", "qwen", "nope"]
    assert lines[-1] == {"summary": {**lines[-1]["summary"], "total": 4, "ok": 3, "skipped": 0, "failed": 1}}
    assert lines[-1]["summary"]["wall_seconds"] > 0 and not r.stderr.strip()


@pytest.mark.parametrize("args, words", [
    (["--executor", "local", "--scheduler", "tcp://127.0.0.1:1"], "--executor dask"),
    (["--workers", "2"], "--executor dask"),
    (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "--scheduler"),
])
def test_executor_option_conflicts_are_one_line(tmp_path, args, words):
    from click.testing import CliRunner

    from loraport.cli import main

    (tmp_path / "jobs.json").write_text(json.dumps([{"adapter": str(AD / "llama_plain"), "out": "o"}]))
    r = CliRunner().invoke(main, ["merge", "--base", str(LLAMA), "--jobs", str(tmp_path / "jobs.json"), *args])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["merge", "--base", str(LLAMA), "--adapter", str(AD / "llama_plain"), "--out",
                                  str(tmp_path / "single"), "--executor", "dask"])
    assert r.exit_code == 2 and "only apply to a batch" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "single").exists()


def test_unreachable_scheduler_is_a_one_line_error(tmp_path):
    import socket

    from loraport.batch import jobs_from_file, run_jobs
    from loraport.errors import BadInputError
    from loraport.executors import DaskExecutor

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "jobs.json").write_text(json.dumps([{"adapter": str(AD / "llama_plain"), "out": "o"}]))
    jobs = jobs_from_file(tmp_path / "jobs.json", str(LLAMA))
    with pytest.raises(BadInputError, match="cannot connect") as e:
        run_jobs(str(LLAMA), jobs, executor=DaskExecutor(f"tcp://127.0.0.1:{port}", connect_timeout=1))
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, words", [
    ({"kind": "train", "out": "x"}, "'kind'"),
    ({"kind": "convert", "adapter": "a", "out": "x"}, "'to'"),
    ({"kind": "validate", "out": "x"}, "takes adapter, artifact"),
    ({"adapter": "a", "out": "x", "memory": "lots"}, "memory"),
    ({"adapter": "a", "out": "x", "bogus": 1}, "'bogus'"),
    ({"kind": "convert", "adapter": ["a", "b"], "to": "peft", "out": "x"}, "one adapter"),
])
def test_bad_job_kinds_are_refused_before_anything_runs(tmp_path, bad, words):
    from loraport.batch import jobs_from_file
    from loraport.errors import BadInputError

    (tmp_path / "jobs.json").write_text(json.dumps([bad]))
    with pytest.raises(BadInputError, match=words):
        jobs_from_file(tmp_path / "jobs.json", str(LLAMA))


def test_a_job_reading_a_later_jobs_output_is_refused(tmp_path):
    from loraport.batch import jobs_from_file
    from loraport.errors import BadInputError

    (tmp_path / "jobs.json").write_text(json.dumps([{"adapter": "b", "out": "a"},
                                                    {"adapter": str(AD / "llama_plain"), "out": "b"}]))
    with pytest.raises(BadInputError, match="list job 1 first"):
        jobs_from_file(tmp_path / "jobs.json", str(LLAMA))


def test_placement_keeps_a_base_on_one_worker_and_splits_big_groups():
    from loraport.batch import Job
    from loraport.executors import place_by_base

    jobs = [Job([("a", 1.0)], f"o{i}", base=str(LLAMA if i < 6 else QWEN)) for i in range(10)]
    two = place_by_base(jobs, ["w1", "w2"])
    assert len({two[i] for i in range(6)}) <= 2 and len({two[i] for i in range(6, 10)}) == 1
    assert sorted(list(two.values()).count(w) for w in ("w1", "w2")) == [5, 5]  # nobody idle
    four = place_by_base(jobs, ["w1", "w2", "w3", "w4"])
    assert {four[i] for i in range(6, 10)} & {four[i] for i in range(6)} == set()  # no worker opens both bases
    assert place_by_base(jobs, []) == {}


def test_resource_hints_never_ask_for_what_no_worker_offers():
    from loraport.batch import Job
    from loraport.executors import _resources

    gpu_job = Job([("a", 1.0)], "o", device="cuda")
    plain = {"w": {"resources": {}}}
    assert _resources(gpu_job, {}, plain) == ({}, "")  # nothing advertised: no constraint (it would wait forever)
    offered = {"w1": {"resources": {"MEMORY": 4 << 30}}, "w2": {"resources": {"MEMORY": 4 << 30, "GPU": 1}}}
    assert _resources(gpu_job, {}, offered) == ({"GPU": 1}, "")  # no "memory" hint: no memory asked
    assert _resources(Job([("a", 1.0)], "o", memory=1 << 30), {}, offered) == ({"MEMORY": 1 << 30}, "")
    big = Job([("a", 1.0)], "o", memory=64 << 30)
    want, why = _resources(big, {}, offered)
    assert not want and "no worker offers" in why and "68.7 GB memory" in why


def test_memory_hint_no_worker_can_meet_is_a_failed_record_not_a_hang(tmp_path, dask_executor):
    d = tmp_path / "m"
    d.mkdir()
    (d / "jobs.json").write_text(json.dumps([{"adapter": str(AD / "llama_plain"), "out": "huge", "memory": "100000GB"},
                                             {"adapter": str(AD / "llama_plain"), "out": "fine"}]))
    res = {r["name"]: r for r in run(d, dask_executor)}
    assert res["huge"]["status"] == "failed" and "no worker offers" in res["huge"]["error"]
    assert res["fine"]["status"] == "ok"


def test_temporaries_of_another_host_are_never_swept(tmp_path):
    """Workers on several hosts share an output folder: a pid from another machine says nothing here."""
    from loraport.outputs import TMP_TAG, host_tag, sweep_stale

    out = tmp_path / "o"
    dead = 999999999
    other = tmp_path / f".o{TMP_TAG}{dead}@{'x' + host_tag()}"
    mine_dead = tmp_path / f".o{TMP_TAG}{dead}@{host_tag()}"
    other.mkdir()
    mine_dead.mkdir()
    sweep_stale(out)
    assert other.exists() and not mine_dead.exists()


def test_a_merge_without_any_base_is_refused_before_anything_runs(tmp_path):
    from click.testing import CliRunner

    from loraport.cli import main

    (tmp_path / "jobs.json").write_text(json.dumps([
        {"kind": "convert", "adapter": str(AD / "llama_plain"), "to": "mlx", "base": str(LLAMA), "out": "c"},
        {"adapter": str(AD / "llama_plain"), "out": "m"}]))
    r = CliRunner().invoke(main, ["merge", "--jobs", str(tmp_path / "jobs.json")])
    assert r.exit_code == 2 and "job 1 (m): no base" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
