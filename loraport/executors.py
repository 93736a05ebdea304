"""Where batch jobs run: here, one after the other (`LocalExecutor`, the default), or on a Dask cluster
(`DaskExecutor`: a LocalCluster on 127.0.0.1 sized to this machine, or an existing scheduler such as one that
dask-jobqueue runs on Slurm/PBS or dask-kubernetes on Kubernetes). Both run `job_runner.run_job` on each job and
return its records in job order, so what they report is identical in shape.

The distribution is Dask's own: futures (a job reading another's output gets that job's future as an argument),
resources (GPU for CUDA jobs, MEMORY for a job's "memory" hint — asked only where workers advertise them) and
retries: a job whose worker dies mid-job is run again elsewhere as often as the scheduler's
`distributed.scheduler.allowed-failures` says (1 on the cluster loraport starts: once, then reported; Dask's
default elsewhere is 3), and an unexpected exception in a job is retried once (`retries=1`). Placement:
jobs sharing a base go to the same worker where the load allows (its base is opened and hashed once there),
loosely, so a dead or busy worker's jobs can still move. Dask is imported only when this executor runs.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict

from loraport.jobs import Job, JobResult
from loraport.paths import identity
from loraport.errors import BadInputError
from loraport.job_runner import run_job

class LocalExecutor:
    """Today's behaviour: the jobs in file order, in this process, sharing one input-hash cache."""

    name = "local"

    def run(self, jobs: list[Job], options: dict, on_result=None) -> list[JobResult]:
        from loraport.manifest import HashCache

        options = {**options, "hash_cache": HashCache.of(options.get("hash_cache", True))}  # one base hash
        results: list[JobResult] = []
        for job in jobs:
            r = run_job(job, options, tuple(results[k] for k in job.after))
            results.append(r)
            if on_result is not None:
                on_result(r)
        return results


class DaskExecutor:
    """Jobs as Dask futures. `scheduler`: tcp://HOST:PORT of a running scheduler; None starts a LocalCluster on
    127.0.0.1 (`n_workers` processes, default one per core, one job at a time each) for the run."""

    name = "dask"

    def __init__(self, scheduler: str | None = None, n_workers: int | None = None, wait_workers: float = 60.0,
                 processes: bool = True, connect_timeout: float = 20.0, group_by_base: bool = True):
        self.scheduler, self.n_workers, self.wait_workers = scheduler, n_workers, wait_workers
        self.group_by_base = group_by_base  # False: Dask places every job freely (bench/fleet_bench.py compares)
        self.connect_timeout = connect_timeout
        self.processes = processes  # False: worker threads in this process (quick to start; for tests)
        self.placement: dict[int, str] = {}  # job index -> the worker it was sent to (for reports and tests)

    def run(self, jobs: list[Job], options: dict, on_result=None) -> list[JobResult]:
        try:
            from distributed import as_completed
        except ImportError:
            raise BadInputError('--executor dask needs Dask: pip install "loraport[dask]"') from None
        options = {**options, "hash_cache": bool(options.get("hash_cache", True))}  # each worker opens its own
        results: list[JobResult | None] = [None] * len(jobs)
        try:
            with self._cluster() as client:
                workers = client.scheduler_info(n_workers=-1)["workers"]
                futures = self._submit(client, jobs, options, workers)
                index = {f.key: i for i, f in futures.items()}
                try:
                    for fut in as_completed(list(futures.values())):
                        i = index[fut.key]
                        results[i] = self._record(fut, jobs[i], results)
                        if on_result is not None:
                            on_result(results[i])
                except BaseException:  # Ctrl-C: what has not started never will
                    client.cancel(list(futures.values()), force=True)
                    raise
        except BaseException:
            # the cluster loraport started is closed now (its workers gone): the hidden temporaries of jobs they
            # were writing are removed. A job already running on your own cluster finishes (Dask cannot stop a
            # running task): its output appears complete, or not at all.
            _sweep([j for j, r in zip(jobs, results) if r is None])
            raise
        return [r for r in results if r is not None]

    # --------------------------------------------------------------------------------------------- cluster
    def _cluster(self):
        import contextlib

        import dask
        from distributed import Client, LocalCluster

        stack = contextlib.ExitStack()
        if self.scheduler is None:
            n = self.n_workers or os.cpu_count() or 1
            # a job whose worker dies is run once more, then reported; no memory limit: a memory-mapped base is
            # resident file cache, not a leak the nanny should kill for
            with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
                # threads: in-process comms, no socket. Processes: every socket on 127.0.0.1 (the scheduler's HTTP
                # server too: left to itself it takes 8787, warning on stderr when that is taken)
                where = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"} if self.processes else \
                    {"dashboard_address": None}
                try:
                    cluster = stack.enter_context(LocalCluster(
                        **where, n_workers=n, threads_per_worker=1,
                        processes=self.processes, memory_limit=0, resources={"MEMORY": _memory_per_worker(n)},
                        silence_logs=logging.CRITICAL))  # the records say what happened: no log lines on stderr
                except (RuntimeError, OSError) as e:
                    raise BadInputError(f"could not start a local Dask cluster ({str(e)[:120]}); run with "
                                        "--executor local, or on a running cluster with --scheduler") from None
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(self.scheduler, timeout=self.connect_timeout))
            except (OSError, TimeoutError, ValueError) as e:
                raise BadInputError(f"--scheduler {self.scheduler}: cannot connect ({str(e)[:120]})") from None
        try:
            client.wait_for_workers(1, timeout=self.wait_workers)
        except (TimeoutError, OSError):
            stack.close()
            where = f"--scheduler {self.scheduler}" if self.scheduler else "the local Dask cluster"
            raise BadInputError(f"{where}: no worker joined within {self.wait_workers:.0f}s; start workers "
                                "(`dask worker SCHEDULER`)") from None
        return _Closing(stack, client)

    # ----------------------------------------------------------------------------------------------- submit
    def _submit(self, client, jobs: list[Job], options: dict, workers: dict) -> dict:
        run = uuid.uuid4().hex[:8]
        self.placement = place_by_base(jobs, list(workers)) if self.group_by_base else {}
        futures: dict[int, object] = {}
        for i, job in enumerate(jobs):
            resources, refusal = _resources(job, options, workers)
            if refusal:
                futures[i] = client.submit(_refused, job, refusal, key=f"loraport-{run}-{i}-refused", pure=False)
                continue
            where = self.placement.get(i)
            futures[i] = client.submit(
                run_job, job, options, [futures[k] for k in job.after], key=f"loraport-{run}-{i}", pure=False,
                retries=1, resources=resources or None,
                **({"workers": [where], "allow_other_workers": True} if where else {}))
        return futures

    def _record(self, fut, job: Job, results: list) -> JobResult:
        if fut.status == "finished":
            return fut.result()
        failed_upstream = [results[k] for k in job.after if results[k] is not None and not results[k].ok]
        if failed_upstream:
            msg = f"not run: job {failed_upstream[0].name!r}, whose output it reads, failed"
        else:
            exc = fut.exception() if fut.status == "error" else None
            if exc is not None and type(exc).__name__ == "KilledWorker":
                n = getattr(exc, "allowed_failures", 0) + 1
                msg = (f"the worker running this job died, {n} time(s) (killed: out of memory?); nothing was "
                       "written")
            else:
                msg = f"{type(exc).__name__}: {str(exc)[:200]}" if exc is not None else f"task {fut.status}"
        now = time.time()
        return JobResult(job.name, job.out, False, msg, 1, kind=job.kind, started=now, finished=now)


class _Closing:
    """The client, closing the cluster it may have started on exit."""

    def __init__(self, stack, client):
        self.stack, self.client = stack, client

    def __enter__(self):
        return self.client

    def __exit__(self, *exc):
        self.stack.close()


def _sweep(jobs: list[Job]) -> None:
    from loraport.outputs import sweep_stale

    for j in jobs:
        if j.kind != "validate":
            try:
                sweep_stale(identity(j.out))
            except OSError:
                pass


def _refused(job: Job, why: str) -> JobResult:
    now = time.time()
    return JobResult(job.name, job.out, False, why, 2, kind=job.kind, started=now, finished=now)


def _memory_per_worker(n: int) -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(1, total // max(1, n))


def _resources(job: Job, options: dict, workers: dict) -> tuple[dict, str]:
    """The resources to ask for, asked only where some worker advertises them (a request no worker can meet
    would wait forever): ({}, "") when nothing is advertised; a refusal line when no worker is big enough."""
    offered = [w.get("resources") or {} for w in workers.values()]
    want: dict[str, float] = {}
    if job.needs_gpu(options.get("device")) and any(r.get("GPU") for r in offered):
        want["GPU"] = 1
    if job.memory and any(r.get("MEMORY") for r in offered):  # the job's own estimate ("memory": "8GB")
        want["MEMORY"] = job.memory
    if want and not any(all(r.get(k, 0) >= v for k, v in want.items()) for r in offered):
        from loraport.console import human_bytes

        need = ", ".join(human_bytes(v) + " memory" if k == "MEMORY" else f"{v:g} {k}" for k, v in want.items())
        return {}, (f"no worker offers what this job needs ({need}); start workers with more "
                    "(`dask worker --resources MEMORY=...,GPU=1`) or lower the job's \"memory\"")
    return want, ""


def place_by_base(jobs: list[Job], workers: list[str]) -> dict[int, str]:
    """Job index -> worker: jobs sharing a base go to one worker, biggest groups first onto the least-loaded
    worker; a group larger than a fair share (jobs / workers) is split so no worker sits idle."""
    if not workers:
        return {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):
        key = str(identity(j.base)) if j.base else f"(no base) {i}"
        groups[key].append(i)
    share = -(-len(jobs) // len(workers))
    load = dict.fromkeys(workers, 0)
    out: dict[int, str] = {}
    for _, idx in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        for c in range(0, len(idx), share):
            w = min(workers, key=lambda a: (load[a], a))
            chunk = idx[c:c + share]
            load[w] += len(chunk)
            out.update(dict.fromkeys(chunk, w))
    return out
