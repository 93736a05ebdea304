"""Fleet scale (issue #20): 40 small merges, the local executor against Dask on the same machine, in one run.

    python bench/fleet_bench.py [--jobs 40] [--size tiny] [--out bench/results/fleet-<date>.txt]

Two synthetic Llama bases (bench/common.py, `--size`, default tiny: ~12 MB) and four PEFT adapters each; the
40 jobs alternate between the bases, each with its own weight and output. Rows:
* local: the jobs in order in this process (today's `--jobs`);
* dask, 1 worker process: the same jobs one at a time through the scheduler: (its time − local) / jobs is
  Dask's overhead per job (scheduling, pickling the job and its record, the worker's own input-hash cache);
* dask, 2 workers, grouped by base (the default) and ungrouped (Dask places every job freely): wall time,
  and which bases each worker opened — with grouping each base is opened on one worker.
Cluster start-up (worker processes importing torch) is timed apart, before a warm-up job on every worker;
outputs are checked identical (sha256) across every row.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_adapter, build_base, table  # noqa: E402

sys.path.insert(0, str(ROOT))


def make_inputs(work: Path, size: str) -> tuple[list[Path], list[list[Path]]]:
    bases, adapters = [], []
    for b in range(2):
        base = work / f"base{b}"
        build_base(base, size, seed=b)
        bases.append(base)
        ads = []
        for a in range(4):
            ad = work / f"ad{b}_{a}"
            build_adapter(ad, size, rank=8, seed=10 * b + a + 1)
            ads.append(ad)
        adapters.append(ads)
    return bases, adapters


def jobs(bases, adapters, n: int, out: Path):
    from loraport.batch import Job

    out.mkdir(parents=True)
    return [Job([(str(adapters[i % 2][(i // 2) % 4]), 0.25 + 0.05 * i)], str(out / f"j{i:02d}"), f"j{i:02d}",
                base=str(bases[i % 2])) for i in range(n)]


def run(executor, js) -> tuple[float, list]:
    from loraport.batch import run_jobs

    t0 = time.perf_counter()
    res = run_jobs(None, js, executor=executor, device="cpu")
    return time.perf_counter() - t0, res


class Warm:
    """A DaskExecutor whose cluster is started once (timed) and reused by every run of a row."""

    def __init__(self, n_workers: int, group: bool):
        import dask
        from distributed import Client, LocalCluster

        from loraport.executors import DaskExecutor

        t0 = time.perf_counter()
        with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
            self.cluster = LocalCluster(host="127.0.0.1", dashboard_address=None, n_workers=n_workers,
                                        threads_per_worker=1, memory_limit=0)
        self.client = Client(self.cluster)
        self.client.run(lambda: __import__("loraport.merging"))  # what every worker imports on its first job
        self.startup = time.perf_counter() - t0
        self.ex = DaskExecutor(self.cluster.scheduler_address, group_by_base=group)

    def close(self):
        self.client.close()
        self.cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (median)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from loraport.executors import LocalExecutor

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    os.environ.setdefault("LORAPORT_CACHE_DIR", str(work / "cache"))
    try:
        bases, adapters = make_inputs(work, a.size)
        rows, digests, notes = [], {}, []
        k = 0

        def measure(label, executor, startup=None):
            nonlocal k
            times, last = [], None
            for _ in range(a.repeat):
                k += 1
                t, res = run(executor, jobs(bases, adapters, a.jobs, work / f"out{k}"))
                bad = [r for r in res if not r.ok]
                if bad:
                    raise SystemExit(f"{label}: {bad[0].name}: {bad[0].error}")
                times.append(t)
                last = res
            digests[label] = [r.sha256 for r in last]
            med = statistics.median(times)
            rows.append([label, f"{med:.2f}", f"{1000 * med / a.jobs:.1f}",
                         "-" if startup is None else f"{startup:.1f}"])
            return med, last

        local, _ = measure("local (in order, this process)", LocalExecutor())
        one = Warm(1, True)
        try:
            d1, _ = measure("dask, 1 worker process", one.ex, one.startup)
        finally:
            one.close()
        per_job = 1000 * (d1 - local) / a.jobs
        for group in (True, False):
            two = Warm(2, group)
            label = f"dask, 2 workers, {'grouped by base' if group else 'ungrouped'}"
            try:
                _, res = measure(label, two.ex, two.startup)
            finally:
                two.close()
            opened: dict[str, set] = defaultdict(set)
            count: dict[str, int] = defaultdict(int)
            for i, r in enumerate(res):
                opened[r.worker].add(bases[i % 2].name)
                count[r.worker] += 1
            notes.append(f"{label}: " + "; ".join(f"worker {i + 1}: {count[w]} jobs, bases {sorted(opened[w])}"
                                                  for i, w in enumerate(sorted(opened))))
        same = len({tuple(v) for v in digests.values()}) == 1
        head = ["executor", "wall s (median)", "ms / job", "cluster start s"]
        text = "\n".join([
            f"fleet_bench: {a.jobs} merges of {a.size} Llama bases (2 bases x 4 adapters), {a.repeat} runs per row, "
            f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, python {platform.python_version()}",
            "", table(rows, head), "",
            f"Dask overhead per job (1 worker vs local): {per_job:+.1f} ms",
            *notes,
            f"outputs identical across rows (sha256 of every job's output): {same}",
        ])
        print(text)
        if a.out:
            Path(a.out).write_text(text + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
