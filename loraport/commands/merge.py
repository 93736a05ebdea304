"""`loraport merge`: base + adapter(s) → merged safetensors (or a baked ONNX model)."""

from __future__ import annotations

import click

from loraport.console import emit_json, err, human_bytes, next_validate, parse_size, warn


def register(group: click.Group) -> None:
    group.add_command(merge_cmd)


@click.command("merge")
@click.option("--base", required=True, type=click.Path(),
              help="HF model folder, diffusers folder, .safetensors or .onnx")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(),
              help="adapter path (repeatable; required unless --adapter-dir or --jobs is given)")
@click.option("--weight", "weights", multiple=True, type=float, help="weight of the adapter at the same position "
              "(repeatable, default 1.0)")
@click.option("--out", type=click.Path(), help="output folder (or file for a single-file base); with "
              "--adapter-dir the folder that receives one output per adapter")
@click.option("--dtype", default="auto", type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              show_default=True, help="output dtype of float tensors (auto = the base's)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--shard-size", default=None, help="re-shard the output, e.g. 5GB (default: mirror the base)")
@click.option("--quantize", default=None, type=click.Choice(["fp16", "bf16", "fp32", "int8", "nf4", "fp4"]),
              help="re-quantize the merged weights")
@click.option("--double-quant", is_flag=True, help="nf4/fp4: quantize the absmax statistics too")
@click.option("--blocksize", default=64, show_default=True, type=int, help="nf4/fp4 block size")
@click.option("--fp16-base", default=None, type=click.Path(), help="with a quantized --base: the original 16-bit "
              "weights to re-quantize from (keeps small deltas)")
@click.option("--format", "adapter_format", default=None, help="force the adapter format (default: detect)")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="refuse adapters whose targets are partly missing from the base")
@click.option("--overwrite", is_flag=True, help="replace an existing --out")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary on stdout")
@click.option("--adapter-dir", default=None, type=click.Path(),
              help="batch: merge every adapter in this folder, each into --out/<name>")
@click.option("--jobs", "jobs_file", default=None, type=click.Path(),
              help='batch: a JSON list of {"adapter": path(s), "weight": w(s), "out": path}')
@click.option("--fail-on-nonfinite", is_flag=True, help="refuse adapters or merged tensors with NaN/Inf "
              "(default: warn)")
@click.option("--no-manifest", is_flag=True, help="skip the integrity manifest (sha256 of outputs and inputs)")
@click.option("--rehash-inputs", is_flag=True, help="hash every input file again instead of reusing the sha256 "
              "that earlier runs remembered for the same unchanged file (cache: $LORAPORT_CACHE_DIR or "
              "~/.cache/loraport)")
@click.option("--reference", default=None, type=click.Path(),
              help="with an .onnx --base: the HF folder it was exported from, to find weights by value when the "
              "exporter renamed them")
def merge_cmd(base, adapters, weights, out, dtype, device, shard_size, quantize, double_quant, blocksize,
              fp16_base, adapter_format, strict, overwrite, as_json, adapter_dir, jobs_file, fail_on_nonfinite,
              no_manifest, rehash_inputs, reference):
    """Merge one or more adapters into a base model: W' = W + Σ wᵢ·ΔWᵢ, computed in fp32, rounded once."""
    from rich.markup import escape

    from loraport.errors import BadInputError
    from loraport.merge import merge

    nonfinite = "fail" if fail_on_nonfinite else "warn"
    if adapter_dir or jobs_file:
        _batch(base, adapters, weights, out, adapter_dir, jobs_file, as_json, adapter_format=adapter_format,
               dtype=dtype, device=device, shard_size=parse_size(shard_size) if shard_size else None,
               overwrite=overwrite, quantize=quantize,
               quant_options={"blocksize": blocksize, "double_quant": double_quant}
               if quantize in ("nf4", "fp4") else {}, strict=strict, fp16_base=fp16_base, nonfinite=nonfinite,
               manifest=not no_manifest, hash_cache=not rehash_inputs)
        return
    if not adapters:
        raise BadInputError("--adapter is required (or --adapter-dir / --jobs for a batch)")
    if not out:
        raise BadInputError("--out is required")
    if len(weights) > len(adapters):
        raise BadInputError(f"{len(weights)} --weight values for {len(adapters)} --adapter paths")
    ws = list(weights) + [1.0] * (len(adapters) - len(weights))
    qopts = {}
    if quantize in ("nf4", "fp4"):
        qopts = {"blocksize": blocksize, "double_quant": double_quant}
    report = merge(base, list(zip(adapters, ws)), out, dtype=dtype, device=device,
                   shard_size=parse_size(shard_size) if shard_size else None, overwrite=overwrite,
                   quantize=quantize, quant_options=qopts, strict=strict, adapter_format=adapter_format,
                   fp16_base=fp16_base, nonfinite=nonfinite, manifest=not no_manifest, reference=reference,
                   hash_cache=not rehash_inputs)  # progress: the reporter the CLI installed (stderr)
    if as_json:
        emit_json(report)
        return
    in_table = {r.get("warning") for r in report.get("quantization") or [] if isinstance(r, dict)}
    for w in report.get("warnings", []) or []:
        if w not in in_table:  # the quantization table prints its own warnings
            warn(w)
    if report.get("skipped_targets"):
        err.print(f"[yellow]skipped {len(report['skipped_targets'])} unmatched target(s)[/yellow]")
    if report.get("quantization"):
        from loraport.quant.report import format_table

        err.print(escape(format_table(report["quantization"])), markup=True)
    n = report.get("tensors_updated", report.get("initializers_updated", "?"))  # the latter: ONNX baking
    size = report.get("bytes_written", report.get("external_data_bytes", 0))
    err.print(f"merged {len(report['adapters'])} adapter(s) into {n} tensor(s) → {report['out']} "
              f"({human_bytes(size)}, {report['seconds']:.1f}s on {report.get('device', '?')})", markup=False)
    if not str(base).endswith(".onnx") or reference:  # a baked ONNX model is validated against its HF folder
        err.print(next_validate(report["out"], reference or base, list(zip(adapters, ws))), markup=False)


def _batch(base, adapters, weights, out, adapter_dir, jobs_file, as_json, adapter_format=None, **merge_options):
    """--adapter-dir / --jobs: one merge per adapter, continuing past failures; exit 1 if any failed."""
    import sys
    from pathlib import Path

    from rich.markup import escape

    from loraport.batch import jobs_from_dir, jobs_from_file, run_jobs
    from loraport.errors import BadInputError

    if adapter_dir and jobs_file:
        raise BadInputError("give either --adapter-dir or --jobs, not both")
    if adapters or weights:
        raise BadInputError("--adapter/--weight cannot be combined with --adapter-dir or --jobs")
    if adapter_dir:
        if not out:
            raise BadInputError("--adapter-dir needs --out (the folder that receives one output per adapter)")
        Path(out).mkdir(parents=True, exist_ok=True)
        jobs = jobs_from_dir(adapter_dir, out, adapter_format)
    else:
        jobs = jobs_from_file(jobs_file)

    def show(r):
        if not as_json:
            if r.ok:
                err.print(f"[green]ok[/green]    {escape(r.name)} → {escape(r.out)} ({r.seconds:.1f}s)", markup=True)
                for w in r.report.get("warnings", []) or []:
                    err.print(f"      [yellow]warning:[/yellow] {escape(w)}", markup=True)
            else:
                err.print(f"[red]FAIL[/red]  {escape(r.name)}: {escape(r.error)}", markup=True)

    results = run_jobs(base, jobs, on_result=show, adapter_format=adapter_format, **merge_options)
    failed = sum(not r.ok for r in results)
    if as_json:
        emit_json({"jobs": [r.as_dict() for r in results], "ok": len(results) - failed, "failed": failed})
    else:
        err.print(f"{len(results) - failed} of {len(results)} merge(s) succeeded")
    if failed:
        sys.exit(1)
