"""The public Python API: `merge`, `convert`, `export_onnx`, `validate`, `inspect`, `verify` (re-exported by the
package; each is also a CLI command, which calls it). They take what the CLI takes — adapters as paths or
(path, weight) pairs, mixed; sizes as "5GB" / "500MB" / ints; dtypes as strings; Hub repo ids found in the
local Hugging Face cache — and return the typed results of loraport/results.py. Bad input raises a
LoraportError subclass whose message names the API's arguments (`shard_size`), not the CLI's flags.

This module imports nothing heavy: the engines load on the first call, so `import loraport` stays cheap."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from loraport import hub
from loraport.errors import BadInputError, LoraportError

if TYPE_CHECKING:
    from loraport.results import (ConvertResult, ExportResult, InspectResult, MergeResult, ValidationReport,
                                  VerifyResult)

PathLike = Union[str, "os.PathLike[str]"]  # noqa: UP007 - a runtime alias, not an annotation
AdapterSpec = Union[PathLike, tuple[PathLike, float]]  # noqa: UP007

DTYPE_NAMES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16",
               "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}

# ------------------------------------------------------------------------------------------ message wording
# The engines word their errors for the CLI (`--shard-size`); called from Python, a message names the argument.
_CLI_WORDING = contextvars.ContextVar("loraport_cli_wording", default=False)
_FLAG_AS_ARGUMENT = {
    "adapter": "adapters", "weight": "weights", "no-strict": "strict=False", "strict": "strict",
    "overwrite": "overwrite=True", "allow-incomplete": "allow_incomplete=True", "lossy": "lossy=True",
    "force": "force=True",
    "rehash-inputs": "hash_cache=False", "fail-on-nonfinite": 'nonfinite="fail"', "no-manifest": "manifest=False",
    "multi-lora": "multi_lora=True", "with-past": "with_past=True", "recapture": "recapture=True",
    "double-quant": 'quant_options={"double_quant": True}', "blocksize": 'quant_options={"blocksize": ...}',
}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


def api_wording(message: str) -> str:
    """`message` with each CLI flag replaced by the argument it stands for (`--shard-size` → `shard_size`),
    except inside `backquotes` (a command for the user to run, such as `hf download ... --local-dir`)."""
    parts = message.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = _FLAG.sub(lambda m: _FLAG_AS_ARGUMENT.get(m.group(1), m.group(1).replace("-", "_")), parts[i])
    return "`".join(parts)


@contextlib.contextmanager
def cli_wording() -> Iterator[None]:
    """Within this block the API leaves messages in CLI terms (the CLI enters it around every command)."""
    token = _CLI_WORDING.set(True)
    try:
        yield
    finally:
        _CLI_WORDING.reset(token)


@contextlib.contextmanager
def _api_terms() -> Iterator[None]:
    try:
        yield
    except LoraportError as e:
        if _CLI_WORDING.get() or not e.args or not isinstance(e.args[0], str) or "--" not in e.args[0]:
            raise
        e.args = (api_wording(e.args[0]), *e.args[1:])
        raise


# ------------------------------------------------------------------------------------------ argument shapes
def adapter_list(adapters: AdapterSpec | Sequence[AdapterSpec] | None, weights: Sequence[float] | None = None,
                 *, required: bool = True) -> list[tuple[str, float]]:
    """[(path, weight)] from one path, one (path, weight) pair, or a list mixing both; `weights` gives the
    weights of the plain paths, in order (default 1.0). Hub repo ids resolve to their cached snapshot."""
    if adapters is None:
        items: list = []
    elif isinstance(adapters, (str, os.PathLike)) or _is_pair(adapters):
        items = [adapters]
    else:
        items = list(adapters)
    plain = sum(1 for a in items if not _is_pair(a))
    if weights is not None and len(weights) != plain:
        raise BadInputError(f"{len(weights)} weights for {plain} adapter path(s); give one per path, or "
                            "(path, weight) pairs")
    wi = iter(weights or ())
    out = []
    for i, a in enumerate(items):
        path, w = (a[0], a[1]) if _is_pair(a) else (a, next(wi, 1.0))
        if not isinstance(path, (str, os.PathLike)):
            raise BadInputError(f"adapters[{i}]: expected a path or a (path, weight) pair, got {a!r}")
        out.append((str(hub.resolve(path, "adapter")), _weight(w, i)))
    if required and not out:
        raise BadInputError("no adapters given (a path, a (path, weight) pair, or a list of them)")
    return out


def _is_pair(a) -> bool:
    """(path, weight): a tuple whose second item is not a path or another pair (a bad weight is reported as
    such), or a 2-list whose second item is a number (JSON has no tuples)."""
    if not isinstance(a, (tuple, list)) or len(a) != 2 or not isinstance(a[0], (str, os.PathLike)):
        return False
    if isinstance(a, tuple):
        return not isinstance(a[1], (str, os.PathLike, tuple, list))
    return isinstance(a[1], (int, float)) and not isinstance(a[1], bool)


def _weight(w, i: int) -> float:
    if isinstance(w, bool):
        raise BadInputError(f"adapters[{i}]: weight {w!r} is not a number")
    try:
        v = float(w)
    except (TypeError, ValueError):
        raise BadInputError(f"adapters[{i}]: weight {w!r} is not a number") from None
    if not math.isfinite(v):
        raise BadInputError(f"adapters[{i}]: weight {w!r} is not finite")
    return v


def size_bytes(size, name: str = "shard_size") -> int | None:
    """None, a positive int of bytes, or a string such as "5GB", "500MB", "2GiB"."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise BadInputError(f"{name}={size!r}: give bytes (an int) or a string such as '5GB' or '500MB'")
    if isinstance(size, int):
        if size <= 0:
            raise BadInputError(f"{name}={size!r}: must be positive")
        return size
    from loraport.console import parse_size

    try:
        return parse_size(size)
    except BadInputError as e:
        raise BadInputError(f"{name}: {e}") from None


def dtype_name(dtype, name: str = "dtype", allowed: Sequence[str] = ("auto", "fp32", "fp16", "bf16")) -> str:
    """'fp16' from 'fp16' / 'float16' / 'half' / torch.float16 (and alike)."""
    key = str(dtype).removeprefix("torch.").lower()
    short = DTYPE_NAMES.get(key)
    if short is None or short not in allowed:
        raise BadInputError(f"{name}={dtype!r}: choose one of {', '.join(allowed)}")
    return short


def _path(p, role: str) -> str | None:
    r = hub.resolve(p, role)
    return None if r is None else str(r)


# ------------------------------------------------------------------------------------------------ verbs
def merge(base: PathLike, adapters: AdapterSpec | Sequence[AdapterSpec], out: PathLike, *,
          weights: Sequence[float] | None = None, dtype="auto", device="auto",
          shard_size: int | str | None = None, quantize: str | None = None, quant_options: dict | None = None,
          strict: bool = True, adapter_format: str | None = None, fp16_base: PathLike | None = None,
          overwrite: bool = False, allow_incomplete: bool = False, nonfinite: str = "warn", manifest: bool = True,
          hash_cache: bool = True, reference: PathLike | None = None, progress=None,
          force: bool = False, tie_embeddings: str = "auto", transformer: str = "transformer") -> MergeResult:
    """Merge adapters into `base` (W' = W + Σ wᵢ·ΔWᵢ in fp32, rounded once) and write `out`: a folder for a
    model folder, a file for a single .safetensors, an .onnx file for an .onnx base, a .gguf file for a .gguf
    base (every tensor in its own ggml type; formats/gguf.md). `quantize`: fp16, bf16,
    fp32, int8, nf4, fp4, fp8, mxfp4. `allow_incomplete`: write an HF-style folder even when the base lacks files
    transformers needs to load it (config.json). `force`: merge an adapter whose merged form behaves
    differently (PEFT activated LoRA), with a warning, instead of refusing it. `tie_embeddings`: auto, keep or
    untie, for a base whose head is tied to its embedding when an adapter trains one side (or both apart): auto
    unties unless both got the same update (config.json then says tie_word_embeddings=false, and a warning says
    why). `transformer`: a DiT LoRA into a diffusers folder's "transformer" (default), "transformer_2" (Wan 2.2
    A14B's low-noise expert) or "both". An fp8 or MXFP4 (gpt-oss) base keeps its own layout unless `dtype` or
    `quantize` says otherwise (formats/fp8.md)."""
    from loraport.results import MergeResult

    with _api_terms():
        ads = adapter_list(adapters, weights)
        rep = run_merge(_path(base, "base"), ads, out, dtype=dtype_name(dtype), device=str(device),
                        shard_size=size_bytes(shard_size), overwrite=overwrite, quantize=quantize,
                        quant_options=quant_options, strict=strict, adapter_format=adapter_format,
                        fp16_base=_path(fp16_base, "fp16_base"), nonfinite=nonfinite, manifest=manifest,
                        reference=_path(reference, "reference"), hash_cache=hash_cache, progress=progress,
                        allow_incomplete=allow_incomplete, force=force, tie_embeddings=tie_embeddings,
                        transformer=transformer)
        return MergeResult.of(rep)


def run_merge(base: str, adapters: list[tuple[str, float]], out: PathLike, **options) -> dict:
    """The engine behind the merge verb, chosen by the base: an .onnx base is baked into (loraport/onnx/baking.py),
    any other is streamed by loraport/merging.py. Engine arguments in, the engine's report dict out; `merge`
    above and batch jobs (loraport/batch.py) both come here. The choice sits above both engines because the
    ONNX one is built on the merge engine (its plan and per-tensor math), which therefore imports nothing of it."""
    if Path(base).suffix == ".onnx":
        return _bake(base, adapters, out, **options)
    if Path(base).suffix == ".gguf":  # a GGUF model: its own source and sink around the same plan and math
        from loraport.gguf_merge import merge_gguf

        return merge_gguf(base, adapters, out, **options)
    from loraport.merging import merge as run

    return run(base, adapters, out, **options)


def _bake(base: str, adapters, out: PathLike, *, dtype: str = "auto", device: str = "auto", shard_size=None,
          quantize=None, fp16_base=None, adapter_format=None, overwrite: bool = False, strict: bool = True,
          reference=None, manifest: bool = True, hash_cache=True, nonfinite: str = "warn", tie_embeddings="auto",
          transformer: str = "transformer", **_unused) -> dict:
    adapters = [(a, 1.0) if isinstance(a, (str, Path)) else (a[0], float(a[1])) for a in adapters]
    if not adapters:
        raise BadInputError("no --adapter given")
    try:
        from loraport.onnx.baking import bake
    except ImportError:
        raise BadInputError("ONNX baking is not available in this installation") from None
    ignored = {"--dtype": dtype != "auto", "--shard-size": shard_size, "--quantize": quantize,
               "--fp16-base": fp16_base, "--format": adapter_format, "--tie-embeddings": tie_embeddings != "auto",
               "--transformer": transformer != "transformer"}
    if any(ignored.values()):  # baking keeps the model's own dtypes and layout and detects adapter formats:
        # refused, never ignored
        raise BadInputError(f"{', '.join(k for k, v in ignored.items() if v)} do(es) not apply to baking into "
                            "an .onnx --base")
    return bake(str(base), [(str(a), w) for a, w in adapters], str(out), overwrite=overwrite, strict=strict,
                device=device, reference=str(reference) if reference else None, manifest=manifest,
                hash_cache=hash_cache, nonfinite=nonfinite)


def convert(adapter: AdapterSpec | Sequence[AdapterSpec] | None, to: str, out: PathLike, *,
            weights: Sequence[float] | None = None, base: PathLike | None = None, format: str | None = None,
            lossy: bool = False, rank: int | None = None, overwrite: bool = False, graph: PathLike | None = None,
            read_options: dict | None = None, write_options: dict | None = None, **onnx_options) -> ConvertResult:
    """Write `adapter` in format `to` without merging (peft, kohya, diffusers, mlx, gguf, torchtune, ...):
    exact where the target can express it, refused otherwise unless `lossy` (SVD, optionally to `rank`).
    `read_options` / `write_options` go to the reader and the writer (e.g. {"mlx_alpha": "apply"},
    {"bake": True}); one the format does not declare is refused, naming those it does.
    `to="onnx-adapter"` writes an .onnx_adapter for the multi-LoRA ONNX `graph`; `to="onnx"` is export_onnx
    (`onnx_options`: opset, dtype, quantize, multi_lora, with_past, recapture, int4)."""
    from loraport.results import ConvertResult

    with _api_terms():
        from loraport.formats import export_targets

        if to in export_targets():
            from loraport.conversion import onnx_convert

            if read_options or write_options:
                raise BadInputError(f"read_options / write_options do not apply to to={to!r} (an ONNX export)")
            ads = adapter_list(adapter, weights, required=to == "onnx-adapter")
            rep = onnx_convert(adapters=ads, to=to, out=str(out), base=_path(base, "base"), format=format,
                               graph=None if graph is None else str(graph), lossy=lossy, rank=rank,
                               overwrite=overwrite, **onnx_options)
            return ConvertResult.of(rep, to)
        unused = sorted(k for k, v in {"graph": graph, "weights": weights, **onnx_options}.items() if v)
        if unused:
            raise BadInputError(f"{', '.join(unused)} only apply to to=" + " / ".join(map(repr, export_targets())))
        ads = adapter_list(adapter)
        if len(ads) != 1 or ads[0][1] != 1.0:
            raise BadInputError("convert takes one adapter path (a weight only applies to ONNX targets)")
        from loraport.conversion import convert_adapter

        rep = convert_adapter(ads[0][0], to, out, base=_path(base, "base"), format=format, lossy=lossy, rank=rank,
                              overwrite=overwrite, write_options=write_options, **(read_options or {}))
        return ConvertResult.of(rep, to)


def export_onnx(base: PathLike, adapters: AdapterSpec | Sequence[AdapterSpec] | None, out: PathLike, *,
                weights: Sequence[float] | None = None, opset: int | None = None, dtype="fp32",
                quantize: str | None = None, multi_lora: bool = False, with_past: bool = False,
                overwrite: bool = False, device="auto", strict: bool = True,
                recapture: bool = False, nonfinite: str = "warn", int4: dict | None = None) -> ExportResult:
    """Export `base` (a transformers model folder) with `adapters` merged — or, `multi_lora=True`, kept as
    switchable inputs with one .onnx_adapter each — to the ONNX folder `out`. `quantize`: int8 or int4;
    `int4`: {"block": 16-256, "symmetric": bool, "search": bool, "accuracy_level": 0-4} (default: symmetric,
    block 32, onnxruntime's own quantizer's codes). `nonfinite`: "warn" (the result's warnings) or "fail"
    (refused) on NaN/Inf, as in merge."""
    from loraport.results import ExportResult

    with _api_terms():
        ads = adapter_list(adapters, weights, required=False)
        try:
            from loraport.onnx.export import export_onnx as run
        except ImportError:
            raise BadInputError("ONNX export is not available in this installation (pip install onnx onnxruntime)") \
                from None
        rep = run(_path(base, "base"), ads, out, opset=opset, dtype=dtype_name(dtype, allowed=("fp32", "fp16")),
                  quantize=quantize, multi_lora=multi_lora, with_past=with_past, overwrite=overwrite,
                  device=str(device), strict=strict, recapture=recapture, nonfinite=nonfinite, int4=int4)
        return ExportResult.of(rep)


def validate(artifact: PathLike, base: PathLike | None = None,
             adapters: AdapterSpec | Sequence[AdapterSpec] | None = None, *, weights: Sequence[float] | None = None,
             tolerance: str | float = "auto", provider: str = "auto", active: str = "all", batch: int = 2,
             seq: int = 16, seed: int = 0) -> ValidationReport:
    """Run `artifact` (merged safetensors or ONNX) and the fp32 reference (base + unmerged adapters) on the
    same inputs. The report's `passed` says whether every case is within tolerance;
    `.raise_if_failed()` turns a failure into ValidationFailed."""
    from loraport.results import ValidationReport

    with _api_terms():
        if isinstance(batch, bool) or isinstance(seq, bool) or not isinstance(batch, int) \
                or not isinstance(seq, int) or batch < 1 or seq < 1:
            raise BadInputError(f"batch={batch!r}, seq={seq!r}: both must be positive integers")
        ads = adapter_list(adapters, weights, required=False)
        from loraport.parity import validate as run

        rep = run(str(artifact), _path(base, "base"), ads, tolerance=tolerance, provider=provider, active=active,
                  batch=batch, seq=seq, seed=seed)
        return ValidationReport.of(rep)


def inspect(path: PathLike, *, format: str | None = None, base: PathLike | None = None,
            plot: PathLike | None = None) -> InspectResult:
    """What an adapter is (format, ranks, alphas, scale rule, targets, DoRA, size, full-rank cost) or, for a
    loraport-merged output, the provenance it records; for a GGUF model (kind "gguf-base"), its storage per tensor
    family and what a merge writes (with a GGUF `base`, the adapter's planned merge into it). `plot`: also write
    a PNG of per-layer spectra."""
    from loraport.inspection import inspect_path
    from loraport.results import InspectResult

    with _api_terms():
        return InspectResult.of(inspect_path(hub.resolve(path, "adapter"), format=format,
                                             base=_path(base, "base"), plot=plot))


def verify(out: PathLike, *, inputs: bool = False) -> VerifyResult:
    """Re-hash `out` against the manifest loraport wrote with it; `inputs=True` also re-hashes the inputs it
    lists. `ok` is False when any file (or, with `inputs`, any input) changed; raises BadInputError when `out`
    has no manifest."""
    from loraport.manifest import verify as run
    from loraport.results import VerifyResult

    with _api_terms():
        return VerifyResult.of(run(out, check_inputs=inputs))
