"""What the public API returns: one small frozen record per verb, its common fields typed, the full report the
CLI prints with `--json` kept as `to_dict()` (so the JSON is derived from the result, never built twice).
`result["key"]` reads the report too, for code written when the API returned plain dicts."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from loraport.errors import ValidationFailed


@dataclass(frozen=True, kw_only=True)
class _Result:
    report: dict = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        """The report as the CLI's --json prints it (a copy: the result stays unchanged)."""
        return copy.deepcopy(self.report)

    def __getitem__(self, key: str):
        return self.report[key]

    def get(self, key: str, default=None):
        return self.report.get(key, default)


@dataclass(frozen=True, kw_only=True)
class MergeResult(_Result):
    out: Path
    files: tuple[str, ...]
    bytes: int
    seconds: float
    manifest: Path | None
    adapters: tuple[dict, ...]
    warnings: tuple[str, ...]
    device: str

    @classmethod
    def of(cls, rep: dict) -> MergeResult:
        return cls(out=Path(rep["out"]), files=tuple(rep.get("files") or (Path(rep["out"]).name,)),
                   bytes=int(rep.get("bytes_written", rep.get("external_data_bytes", 0))),
                   seconds=float(rep.get("seconds", 0.0)),
                   manifest=Path(rep["manifest"]) if rep.get("manifest") else None,
                   adapters=tuple(rep.get("adapters", ())), warnings=tuple(rep.get("warnings", ())),
                   device=str(rep.get("device", "")), report=rep)


@dataclass(frozen=True, kw_only=True)
class ConvertResult(_Result):
    out: Path
    to: str
    source_format: str | None
    lossy: bool
    notes: tuple[str, ...]

    @classmethod
    def of(cls, rep: dict, to: str) -> ConvertResult:
        return cls(out=Path(rep["out"]), to=to, source_format=rep.get("source_format"),
                   lossy=bool(rep.get("lossy", False)), notes=tuple(rep.get("notes", ())), report=rep)


@dataclass(frozen=True, kw_only=True)
class ExportResult(_Result):
    out: Path
    kind: str
    bytes: int
    seconds: float
    notes: tuple[str, ...]

    @classmethod
    def of(cls, rep: dict) -> ExportResult:
        return cls(out=Path(rep["out"]), kind=str(rep.get("kind", "")), bytes=int(rep.get("external_data_bytes", 0)),
                   seconds=float(rep.get("seconds", 0.0)), notes=tuple(rep.get("notes", ())), report=rep)


@dataclass(frozen=True, kw_only=True)
class ValidationReport(_Result):
    artifact: str
    passed: bool
    kind: str
    cases: tuple[dict, ...]
    tolerance: dict

    @classmethod
    def of(cls, rep: dict) -> ValidationReport:
        return cls(artifact=str(rep["artifact"]), passed=bool(rep["passed"]), kind=str(rep.get("kind", "")),
                   cases=tuple(rep.get("cases", ())), tolerance=dict(rep.get("tolerance", {})), report=rep)

    def failed_cases(self) -> list[str]:
        return [c["case"] for c in self.cases if not c["passed"]]

    def raise_if_failed(self) -> ValidationReport:
        """Raise ValidationFailed (exit 1 in the CLI) when a case is outside tolerance; else return self."""
        if not self.passed:
            bad = self.failed_cases()
            raise ValidationFailed(f"{self.artifact}: {len(bad)} case(s) outside tolerance ({', '.join(bad)}); "
                                   f"{self.tolerance.get('why', '')}")
        return self


@dataclass(frozen=True, kw_only=True)
class InspectResult(_Result):
    path: Path
    kind: str  # "adapter", "merged-output" or "gguf-base" (a GGUF model: report["base"] is its storage)
    format: str | None  # the adapter format; None for a merged output
    provenance: dict | None  # what a loraport-merged output records about its inputs

    @classmethod
    def of(cls, rep: dict) -> InspectResult:
        kind = rep.get("kind") if rep.get("kind") in ("merged-output", "gguf-base") else "adapter"
        return cls(path=Path(rep["path"]), kind=kind, format=rep.get("format") if kind == "adapter" else None,
                   provenance=rep.get("provenance"), report=rep)


@dataclass(frozen=True, kw_only=True)
class VerifyResult(_Result):
    out: Path
    ok: bool
    files_checked: int
    problems: tuple[str, ...]
    inputs_changed: tuple[str, ...]
    manifest: Path

    @classmethod
    def of(cls, rep: dict) -> VerifyResult:
        return cls(out=Path(rep["out"]), ok=bool(rep["ok"]) and not rep.get("inputs_changed"),
                   files_checked=int(rep["files_checked"]), problems=tuple(rep["problems"]),
                   inputs_changed=tuple(rep.get("inputs_changed", ())), manifest=Path(rep["manifest"]), report=rep)
