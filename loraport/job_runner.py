"""One batch job, run where it is sent (this process or a Dask worker): skipped when its output already
verifies, else run through the public engines; always a `JobResult`, never an exception for a job's own
failure. Shared by every executor (loraport/executors.py), so their records are identical in shape.

At-least-once execution is made safe here: a job may run twice (a worker that died mid-job is retried), and
its output is written atomically (loraport/outputs.py), so the second run either finds the first one's
complete output — verified against its manifest, made from the same inputs by the same job — and skips, or
finds nothing (the dead run's hidden temporary is swept) and writes it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from loraport.jobs import Job, JobResult
from loraport.paths import identity
from loraport.errors import BadInputError, LoraportError

# batch options that only a merge takes (the others go to every kind that has them)
_MERGE_ONLY = ("dtype", "shard_size", "quantize", "quant_options", "strict", "fp16_base", "nonfinite",
               "allow_incomplete", "adapter_format", "tie_embeddings")


def run_job(job: Job, options: dict, upstream: tuple = ()) -> JobResult:
    """Run `job` with the batch's `options` (merge's keyword arguments). `upstream`: the records of the jobs
    whose outputs it reads; if one of them failed, this one is reported without running."""
    from loraport.outputs import owner_tag

    t0, started = time.perf_counter(), time.time()
    bad = [u for u in upstream if not u.ok]
    try:
        if bad:
            r = JobResult(job.name, job.out, False, f"not run: job {bad[0].name!r}, whose output it reads, failed",
                          1)
        else:
            r = _skip_or_run(job, options)
    except LoraportError as e:
        hint = f" ({e.flag_hint[0]} {e.flag_hint[1]})" if e.flag_hint else ""
        r = JobResult(job.name, job.out, False, str(e) + hint, e.exit_code)
    except OSError as e:
        r = JobResult(job.name, job.out, False, f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), 1)
    except (ValueError, RuntimeError, TypeError, KeyError, IndexError, AttributeError) as e:  # a reader's bug
        r = JobResult(job.name, job.out, False, f"internal error: {type(e).__name__}: {str(e)[:200]}", 1)
    r.kind, r.worker, r.started, r.finished = job.kind, owner_tag(), started, time.time()
    r.seconds = time.perf_counter() - t0
    return r


def _skip_or_run(job: Job, options: dict) -> JobResult:
    if job.kind != "validate" and not options.get("overwrite"):
        digest = done_before(job, options)
        if digest is not None:
            return JobResult(job.name, job.out, True, status="skipped", sha256=digest)
    rep = _run(job, options)
    if job.kind == "validate":
        if not rep.get("passed"):
            failed = [c.get("case") for c in rep.get("cases", []) if not c.get("passed")]
            return JobResult(job.name, job.out, False, f"validation failed: {job.out} is outside the tolerance "
                             f"in {', '.join(map(str, failed)) or 'some case'} (run `loraport validate {job.out}` "
                             "for the table)", 1, report=rep)
        return JobResult(job.name, job.out, True, report=rep)
    return JobResult(job.name, job.out, True, report=rep, sha256=output_digest(job.out))


def _run(job: Job, options: dict) -> dict:
    from loraport import api
    from loraport.hub import resolve
    from loraport.manifest import HashCache

    if job.base is None and job.needs_base():
        raise BadInputError(f"job {job.name!r}: no base: give 'base' in the job or --base")
    ads = [(str(resolve(a, "adapter")), w) for a, w in job.adapters]  # a Hub id: its cached snapshot
    base = None if job.base is None else str(resolve(job.base, "base"))
    device = job.device or options.get("device", "auto")
    if job.kind == "merge":
        opts = {**options, "hash_cache": HashCache.of(options.get("hash_cache", True)), "device": device}
        if job.format:
            opts["adapter_format"] = job.format
        return api.run_merge(base, ads, job.out, **opts)
    if job.kind == "validate":
        from loraport.parity import validate

        return validate(job.out, base, ads or None, tolerance=job.tolerance, provider=job.provider)
    if job.to == "onnx":
        from loraport.conversion import onnx_convert

        return onnx_convert(adapters=ads, to="onnx", out=job.out, base=base, format=job.format,
                            overwrite=options.get("overwrite", False), device=device)
    from loraport.conversion import convert_adapter

    return convert_adapter(ads[0][0], job.to, job.out, base=base, format=job.format,
                           overwrite=options.get("overwrite", False), manifest=options.get("manifest", True),
                           hash_cache=options.get("hash_cache", True))


# ------------------------------------------------------------------------------------------- skip check
def done_before(job: Job, options: dict) -> str | None:
    """The output's digest when `job.out` is already this job's complete output: its files match its manifest,
    the manifest's plan is this job's (same base, adapters, weights, target, dtype) and the inputs it lists are
    unchanged (sha256, remembered by the input-hash cache). None: run the job."""
    from loraport import manifest as mf

    out = Path(job.out)
    if not mf.manifest_path(out).is_file():
        return None
    try:
        rep = mf.verify(out)
        _, m = mf.load(out)
    except LoraportError:
        return None
    if not rep["ok"] or not _same_job(job, m.get("plan") or {}, options):
        return None
    inputs = m.get("inputs") or {}
    if not isinstance(inputs, dict) or not _inputs_unchanged(inputs, options):
        return None
    return tree_digest({rel: e.get("sha256") for rel, e in m["files"].items()})


def _same_job(job: Job, plan: dict, options: dict) -> bool:
    def same(a, b) -> bool:
        return a is None and b is None or (a is not None and b is not None and
                                           identity(str(a)) == identity(str(b)))

    if job.kind == "convert" and job.to != "onnx":
        return plan.get("to") == job.to and same(plan.get("source"), job.adapters[0][0]) \
            and same(plan.get("base"), job.base)
    ads = plan.get("adapters")
    if not isinstance(ads, list) or len(ads) != len(job.adapters) or not same(plan.get("base"), job.base):
        return False
    if any(not isinstance(a, dict) or not same(a.get("path"), p) or a.get("weight") != w
           for a, (p, w) in zip(ads, job.adapters)):
        return False
    if job.kind == "convert":
        return plan.get("to") == "onnx"
    return plan.get("to") is None and plan.get("dtype", "auto") == options.get("dtype", "auto") \
        and plan.get("quantize") == options.get("quantize")


def _inputs_unchanged(inputs: dict, options: dict) -> bool:
    from loraport.manifest import HashCache, sha256_file

    cache = HashCache.of(options.get("hash_cache", True))
    hash_of = cache.sha256 if cache is not None else sha256_file
    try:
        return all(Path(p).is_file() and hash_of(p) == h for p, h in inputs.items())
    except (OSError, LoraportError):
        return False


def tree_digest(files: dict[str, str]) -> str:
    """sha256 of `sha256  path` lines sorted by path (what `sha256sum` prints): one digest for a folder."""
    lines = "".join(f"{h}  {rel}\n" for rel, h in sorted(files.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def output_digest(out: str | Path) -> str | None:
    """A single file: its sha256. A folder: `tree_digest` of its files, loraport's manifest left out (it records
    paths and times, not content). From the manifest when it has one (hashed while written), else re-read."""
    from loraport import manifest as mf

    out = Path(out)
    if not out.exists():
        return None
    try:
        _, m = mf.load(out)
        files = {rel: e["sha256"] for rel, e in m["files"].items()}
    except (LoraportError, KeyError, TypeError, AttributeError):
        files = {rel: mf.sha256_file(f) for rel, f in mf._files_of(out).items()}
    if out.is_file():
        return files.get(out.name)
    return tree_digest(files)
