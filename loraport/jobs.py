"""A batch job and its one result record (the same from every executor), kept apart from the parsing
(loraport/batch.py) and the running (loraport/job_runner.py, loraport/executors.py), which all use them."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("merge", "convert", "validate")


@dataclass
class Job:
    adapters: list[tuple[str, float]]
    out: str  # a validate job: the artifact it checks
    name: str = ""
    kind: str = "merge"
    base: str | None = None  # None: the batch's --base (merge, convert --to onnx) or none (convert, validate)
    to: str | None = None  # convert: the target format ("onnx": an ONNX export)
    format: str | None = None  # the adapters' format (default: detect)
    device: str | None = None  # overrides the batch's --device (merge, ONNX export)
    provider: str = "auto"  # validate: the onnxruntime provider
    tolerance: str | float = "auto"  # validate
    memory: int | None = None  # bytes a worker should set aside (a Dask resource hint)
    after: list[int] = field(default_factory=list)  # earlier jobs whose outputs this one reads

    def inputs(self) -> list[str]:
        return [a for a, _ in self.adapters] + ([self.base] if self.base else []) + \
            ([self.out] if self.kind == "validate" else [])

    def needs_base(self) -> bool:
        return self.kind == "merge" or self.to == "onnx"

    def needs_gpu(self, device: str | None) -> bool:
        """A CUDA merge or export, or a validation on the CUDA provider: a hint for the scheduler."""
        if self.kind == "validate":
            return self.provider.lower().startswith("cuda")
        return str(self.device or device or "").startswith("cuda")


@dataclass
class JobResult:
    """One record per job, the same from every executor (`as_dict` is what --json / --jsonl print).
    status: ok, failed or skipped (its output already verified against its manifest: done by an earlier run)."""

    name: str
    out: str
    ok: bool
    error: str = ""
    exit_code: int = 0
    seconds: float = 0.0
    report: dict = field(default_factory=dict)
    kind: str = "merge"
    status: str = ""
    sha256: str | None = None  # the output's digest (see job_runner.output_digest)
    worker: str = ""  # <pid>@<host> of the process that ran it
    started: float = 0.0  # Unix time
    finished: float = 0.0

    def as_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "out": self.out, "ok": self.ok,
             "status": self.status or ("ok" if self.ok else "failed"), "seconds": round(self.seconds, 3),
             "started": round(self.started, 3), "finished": round(self.finished, 3), "worker": self.worker,
             "sha256": self.sha256}
        if not self.ok:
            d["error"] = self.error
            d["exit_code"] = self.exit_code
        elif self.kind == "validate":
            d["passed"] = self.report.get("passed")
        else:
            d["tensors_updated"] = self.report.get("tensors_updated")
            d["bytes_written"] = self.report.get("bytes_written")
            d["warnings"] = self.report.get("warnings", [])
        return d


def summary(results: list[JobResult]) -> dict:
    """The end-of-run line: counts by status and the wall time from the first start to the last finish."""
    by = {s: sum(r.as_dict()["status"] == s for r in results) for s in ("ok", "skipped", "failed")}
    starts, ends = [r.started for r in results if r.started], [r.finished for r in results if r.finished]
    return {"total": len(results), "ok": by["ok"] + by["skipped"], "skipped": by["skipped"], "failed": by["failed"],
            "wall_seconds": round(max(ends) - min(starts), 3) if starts and ends else 0.0}
