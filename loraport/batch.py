"""Batch merging: many adapters into one base, one output each, continuing past a bad one.

Jobs come from a folder (`--adapter-dir DIR`: every entry of DIR that a reader recognises becomes
OUTDIR/<name>) or a job file (`--jobs FILE`: a JSON list of {"adapter": path | [paths], "weight": w | [ws],
"out": path}). Each job is an ordinary `merge()` call with its own staged output, so a failed job leaves
nothing behind and never stops the others. The base is opened by each job (memory-mapped, read-only: the
page cache is shared, nothing is copied).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraport.errors import BadInputError, LoraportError
from loraport.jsonfile import MAX_JSON

_BAD_NAME_CHARS = ("/", "\\", "\x00")


@dataclass
class Job:
    adapters: list[tuple[str, float]]
    out: str
    name: str = ""


@dataclass
class JobResult:
    name: str
    out: str
    ok: bool
    error: str = ""
    exit_code: int = 0
    seconds: float = 0.0
    report: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"name": self.name, "out": self.out, "ok": self.ok, "seconds": round(self.seconds, 3)}
        if not self.ok:
            d["error"] = self.error
            d["exit_code"] = self.exit_code
        else:
            d["tensors_updated"] = self.report.get("tensors_updated")
            d["bytes_written"] = self.report.get("bytes_written")
            d["warnings"] = self.report.get("warnings", [])
        return d


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
        k = os.path.normcase(str(Path(j.out).resolve())).casefold()
        first = seen.setdefault(k, j)
        if first is not j:
            a, b = (", ".join(x for x, _ in job.adapters) for job in (first, j))
            raise BadInputError(f"{where}: {a} and {b} would both write {j.out}; rename one of them "
                                "(or use --jobs with distinct outputs)")


def jobs_from_file(path: str | Path) -> list[Job]:
    """A JSON list of {"adapter": p | [p...], "weight": w | [w...] (optional), "out": path, "name": optional}.
    Relative paths are relative to the job file's folder."""
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
    here = p.parent
    jobs = []
    for i, j in enumerate(data):
        where = f"--jobs {p}: job {i}"
        if not isinstance(j, dict):
            raise BadInputError(f"{where}: expected an object with adapter and out")
        ads = j.get("adapter", j.get("adapters"))
        ads = [ads] if isinstance(ads, str) else ads
        if not isinstance(ads, list) or not ads or not all(isinstance(a, str) and a for a in ads):
            raise BadInputError(f"{where}: 'adapter' must be a path or a list of paths")
        ws = j.get("weight", j.get("weights", [1.0] * len(ads)))
        ws = [ws] if isinstance(ws, (int, float)) and not isinstance(ws, bool) else ws
        if not isinstance(ws, list) or len(ws) != len(ads) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w == w for w in ws):
            raise BadInputError(f"{where}: 'weight' must be a number or a list with one number per adapter")
        out = j.get("out")
        if not isinstance(out, str) or not out or "\x00" in out:
            raise BadInputError(f"{where}: 'out' must be a path")
        name = j.get("name", Path(out).name)
        if not isinstance(name, str):
            raise BadInputError(f"{where}: 'name' must be a string")
        jobs.append(Job([(_adapter_path(here, a), float(w)) for a, w in zip(ads, ws)], str(here / out), name))
    _refuse_collisions(jobs, f"--jobs {p}")
    return jobs


def _adapter_path(here: Path, a: str) -> str:
    """A job's adapter relative to the jobs file; a Hub id (org/name) stays as written when no such path exists."""
    from loraport.hub import parse_repo_id

    return a if not (here / a).exists() and parse_repo_id(a) is not None else str(here / a)


def run_jobs(base: str | Path, jobs: list[Job], on_result=None, **merge_options) -> list[JobResult]:
    """Run each job with `merge()`; a failing job is recorded and the next one runs."""
    from loraport.hub import resolve
    from loraport.manifest import HashCache
    from loraport.api import run_merge

    merge_options["hash_cache"] = HashCache.of(merge_options.get("hash_cache", True))  # one base hash per batch
    results = []
    for job in jobs:
        t0 = time.perf_counter()
        try:
            ads = [(str(resolve(a, "adapter")), w) for a, w in job.adapters]  # a Hub id: its cached snapshot
            rep = run_merge(base, ads, job.out, **merge_options)
            r = JobResult(job.name, job.out, True, report=rep)
        except LoraportError as e:
            hint = f" ({e.flag_hint[0]} {e.flag_hint[1]})" if e.flag_hint else ""  # batch is merge: it has them
            r = JobResult(job.name, job.out, False, str(e) + hint, e.exit_code)
        except OSError as e:
            r = JobResult(job.name, job.out, False, f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), 1)
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as e:  # a reader's bug: report, go on
            r = JobResult(job.name, job.out, False, f"internal error: {type(e).__name__}: {str(e)[:200]}", 1)
        r.seconds = time.perf_counter() - t0
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results
