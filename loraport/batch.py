"""Batch jobs: many merges (and conversions, ONNX exports, validations) in one run, continuing past a bad one.

Jobs come from a folder (`--adapter-dir DIR`: every entry of DIR that a reader recognises becomes
OUTDIR/<name>) or a job file (`--jobs FILE`: a JSON list of jobs, see `jobs_from_file`). Each job is one
ordinary call into the engines with its own staged output, so a failed job leaves nothing behind and never
stops the others. The base is opened by each job (memory-mapped, read-only: the page cache is shared, nothing
is copied). This module parses jobs (loraport/jobs.py holds a job and its record); loraport/job_runner.py runs a job and
loraport/executors.py runs many (here, or on a Dask cluster), so every executor reports the same records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraport.paths import identity
from loraport.errors import BadInputError
from loraport.jobs import KINDS, Job, JobResult, summary  # noqa: F401 - JobResult, summary: re-exported
from loraport.jsonfile import MAX_JSON

_BAD_NAME_CHARS = ("/", "\\", "\x00")


def _safe_name(name: str, where: str) -> str:
    if not name or name in (".", "..") or any(c in name for c in _BAD_NAME_CHARS) or name.startswith("."):
        raise BadInputError(f"{where}: {name!r} cannot name an output folder")
    return name


def jobs_from_dir(adapter_dir: str | Path, out_dir: str | Path, adapter_format: str | None = None) -> list[Job]:
    """One job per entry of `adapter_dir` that a reader recognises (or every entry, with a forced format):
    OUTDIR/<entry name> (a file adapter's suffix is dropped)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise BadInputError(f"--adapter-dir {d}: not a folder")
    from loraport.formats import formats

    jobs = []
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        if adapter_format is None and not any(f.detect(p) > 0 for f in formats().values()):
            continue
        name = _safe_name(p.stem if p.is_file() else p.name, str(d))
        jobs.append(Job([(str(p), 1.0)], str(Path(out_dir) / name), name))
    if not jobs:
        raise BadInputError(f"--adapter-dir {d}: no adapters found in it")
    _refuse_collisions(jobs, f"--adapter-dir {d}")
    return jobs


def _refuse_collisions(jobs: list[Job], where: str) -> None:
    """Two jobs writing one output would replace one result with the other (under --overwrite, silently):
    refused before anything is written. Names equal but for case collide too (macOS, Windows, exFAT)."""
    seen: dict[str, Job] = {}
    for j in jobs:
        k = os.path.normcase(str(identity(j.out))).casefold()
        first = seen.setdefault(k, j)
        if first is not j:
            a, b = (", ".join(x for x, _ in job.adapters) for job in (first, j))
            raise BadInputError(f"{where}: {a} and {b} would both write {j.out}; rename one of them "
                                "(or use --jobs with distinct outputs)")


def jobs_from_file(path: str | Path, base: str | None = None) -> list[Job]:
    """A JSON list of jobs. Every job: "out" (a path), "name" (optional), "kind" (merge by default).
    merge: "adapter": p | [p...], "weight": w | [w...] (optional), "base" (default: `base`), "device".
    convert: "adapter": p, "to": a format ("onnx": an ONNX export of "base" with the adapters merged).
    validate: "artifact" (instead of "out"), "base" / "adapter" / "weight" (default: what its manifest
    records), "tolerance", "provider". Any job: "memory" ("8GB": a hint for the scheduler). `base` is the
    default base of merges and ONNX exports only (a conversion uses a base only when its job names one).
    Relative paths are relative to the job file's folder. A job may read an earlier job's output."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_JSON:
            raise ValueError(f"{p.stat().st_size} bytes, at most {MAX_JSON}")
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"--jobs {p}: not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadInputError(f"--jobs {p}: invalid JSON ({str(e)[:100]})") from None
    if not isinstance(data, list) or not data:
        raise BadInputError(f"--jobs {p}: expected a non-empty JSON list of jobs")
    jobs = [_job(p.parent, j, f"--jobs {p}: job {i}", base) for i, j in enumerate(data)]
    _refuse_collisions([j for j in jobs if j.kind != "validate"], f"--jobs {p}")
    _link(jobs, f"--jobs {p}")
    return jobs


_KEYS = {"merge": {"adapter", "adapters", "weight", "weights", "base", "device"},
         "convert": {"adapter", "adapters", "weight", "weights", "base", "device", "to", "format"},
         "validate": {"artifact", "adapter", "adapters", "weight", "weights", "base", "tolerance", "provider"}}


def _job(here: Path, j, where: str, default_base: str | None) -> Job:
    if not isinstance(j, dict):
        raise BadInputError(f"{where}: expected an object with adapter and out")
    kind = j.get("kind", "merge")
    if kind not in KINDS:
        raise BadInputError(f"{where}: 'kind' must be one of {', '.join(KINDS)}")
    known = _KEYS[kind] | {"kind", "name", "memory"} | ({"out"} if kind != "validate" else set())
    unknown = sorted(set(j) - known)
    if unknown:
        raise BadInputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for a {kind} job (it takes "
                            f"{', '.join(sorted(known - {'adapters', 'weights'}))})")
    target = j.get("artifact" if kind == "validate" else "out")
    if not isinstance(target, str) or not target or "\x00" in target:
        raise BadInputError(f"{where}: {'artifact' if kind == 'validate' else 'out'!r} must be a path")
    name = j.get("name", Path(target).name)
    if not isinstance(name, str):
        raise BadInputError(f"{where}: 'name' must be a string")
    base, to = _opt_str(j, "base", where), _opt_str(j, "to", where)
    if not base and (kind == "merge" or to == "onnx"):  # validate: its manifest's base; convert: none unless given
        base = default_base
    job = Job(_adapters(here, j, where, required=kind != "validate"), str(here / target), name, kind,
              str(here / base) if base else None, to=to,
              format=_opt_str(j, "format", where), device=_opt_str(j, "device", where),
              provider=_opt_str(j, "provider", where) or "auto", tolerance=_tolerance(j, where),
              memory=_memory(j, where))
    if kind == "convert" and not job.to:
        raise BadInputError(f"{where}: a convert job needs 'to' (a format, or onnx)")
    if kind == "convert" and job.to != "onnx" and (len(job.adapters) != 1 or job.adapters[0][1] != 1.0):
        raise BadInputError(f"{where}: convert takes one adapter (a weight only applies to --to onnx)")
    return job


def check_bases(jobs: list[Job], where: str) -> None:
    """Before anything runs: every merge and ONNX export has a base (its own, or the batch's --base)."""
    for i, j in enumerate(jobs):
        if j.base is None and j.needs_base():
            raise BadInputError(f"{where}: job {i} ({j.name}): no base: give 'base' in the job or --base")


def _opt_str(j: dict, key: str, where: str) -> str | None:
    v = j.get(key)
    if v is not None and (not isinstance(v, str) or not v or "\x00" in v):
        raise BadInputError(f"{where}: {key!r} must be a non-empty string")
    return v


def _tolerance(j: dict, where: str):
    t = j.get("tolerance", "auto")
    if isinstance(t, bool) or not isinstance(t, (str, int, float)):
        raise BadInputError(f"{where}: 'tolerance' must be a number or \"auto\"")
    return t


def _memory(j: dict, where: str) -> int | None:
    m = j.get("memory")
    if m is None:
        return None
    from loraport.api import size_bytes

    try:
        return size_bytes(m, "memory")
    except BadInputError as e:
        raise BadInputError(f"{where}: {e}") from None


def _adapters(here: Path, j: dict, where: str, required: bool) -> list[tuple[str, float]]:
    ads = j.get("adapter", j.get("adapters"))
    if ads is None and not required:
        return []
    ads = [ads] if isinstance(ads, str) else ads
    if not isinstance(ads, list) or not ads or not all(isinstance(a, str) and a and "\x00" not in a for a in ads):
        raise BadInputError(f"{where}: 'adapter' must be a path or a list of paths")
    ws = j.get("weight", j.get("weights", [1.0] * len(ads)))
    ws = [ws] if isinstance(ws, (int, float)) and not isinstance(ws, bool) else ws
    if not isinstance(ws, list) or len(ws) != len(ads) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w == w and abs(w) != float("inf")
            for w in ws):
        raise BadInputError(f"{where}: 'weight' must be a number or a list with one number per adapter")
    return [(_adapter_path(here, a), float(w)) for a, w in zip(ads, ws)]


def _link(jobs: list[Job], where: str) -> None:
    """A job that reads another job's output runs after it (`after`); the producer must come first in the file,
    which also rules out cycles."""
    def key(p: str) -> str:
        return os.path.normcase(str(identity(p))).casefold()

    made = {key(j.out): i for i, j in enumerate(jobs) if j.kind != "validate"}
    for i, j in enumerate(jobs):
        for inp in j.inputs():
            k = made.get(key(inp))
            if k is None or k == i:
                continue
            if k > i:
                raise BadInputError(f"{where}: job {i} reads {inp}, which job {k} writes; list job {k} first")
            j.after.append(k)


def _adapter_path(here: Path, a: str) -> str:
    """A job's adapter relative to the jobs file; a Hub id (org/name) stays as written when no such path exists."""
    from loraport.hub import parse_repo_id

    return a if not (here / a).exists() and parse_repo_id(a) is not None else str(here / a)


def run_jobs(base: str | Path | None, jobs: list[Job], on_result=None, executor=None,
             **options) -> list[JobResult]:
    """Run every job (on `executor`: default the local one, in order); a failing job is recorded and the
    others run. Returns the records in job order."""
    from loraport.executors import LocalExecutor

    for j in jobs:
        if j.base is None and j.needs_base():
            j.base = None if base is None else str(base)
    return (executor or LocalExecutor()).run(jobs, options, on_result)
