"""`loraport merge`: base + adapter(s) → merged safetensors (or a baked ONNX model)."""

from __future__ import annotations

import click

from loraport.console import emit_json, err, human_bytes, next_validate, parse_size, warn


def register(group: click.Group) -> None:
    group.add_command(merge_cmd)


@click.command("merge")
@click.option("--base", default=None, type=click.Path(),
              help="HF model folder, diffusers folder, .safetensors or .onnx (with --jobs: the default base)")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(),
              help="adapter path (repeatable; required unless --adapter-dir or --jobs is given)")
@click.option("--weight", "weights", multiple=True, type=float, help="weight of the adapter at the same position "
              "(repeatable: one per --adapter, or none for 1.0 each)")
@click.option("--out", type=click.Path(), help="output folder (or file for a single-file base); with "
              "--adapter-dir the folder that receives one output per adapter")
@click.option("--dtype", default="auto", type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              show_default=True, help="output dtype of float tensors (auto = the base's; an fp8 base: its fp8 layout, "
              "a dtype here writes 16/32-bit instead)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--shard-size", default=None, help="re-shard the output, e.g. 5GB (default: mirror the base)")
@click.option("--quantize", default=None,
              type=click.Choice(["fp16", "bf16", "fp32", "int8", "nf4", "fp4", "fp8", "mxfp4"]),
              help="re-quantize the merged weights (an fp8 or MXFP4 base is written back in its own layout without it)")
@click.option("--double-quant", is_flag=True, help="nf4/fp4: quantize the absmax statistics too")
@click.option("--blocksize", default=None, type=int, help="nf4/fp4 block size  [default: 64]")
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
@click.option("--executor", default=None, type=click.Choice(["local", "dask"]),
              help="batch: run the jobs here, in order (local, the default), or on Dask (a LocalCluster on "
              "127.0.0.1 sized to this machine, or --scheduler's cluster; pip install \"loraport[dask]\")")
@click.option("--scheduler", default=None, help="batch: tcp://HOST:PORT of a running Dask scheduler (implies "
              "--executor dask)")
@click.option("--workers", "n_workers", default=None, type=click.IntRange(min=1),
              help="batch, --executor dask without --scheduler: worker processes  [default: one per core]")
@click.option("--jsonl", is_flag=True, help="batch: print each job's record on stdout as a JSON line when it "
              "ends, then a summary line")
@click.option("--fail-on-nonfinite", is_flag=True, help="refuse adapters or merged tensors with NaN/Inf "
              "(default: warn)")
@click.option("--no-manifest", is_flag=True, help="skip the integrity manifest (sha256 of outputs and inputs)")
@click.option("--rehash-inputs", is_flag=True, help="hash every input file again instead of reusing the sha256 "
              "that earlier runs remembered for the same unchanged file (cache: $LORAPORT_CACHE_DIR or "
              "~/.cache/loraport)")
@click.option("--allow-incomplete", is_flag=True, help="write a model folder even when the base lacks files "
              "transformers needs to load it (config.json)")
@click.option("--force", is_flag=True, help="merge an adapter whose merged form behaves differently (PEFT "
              "activated LoRA: its effect then starts at the first token, not at the invocation), with a warning")
@click.option("--tie-embeddings", default="auto", type=click.Choice(["auto", "keep", "untie"]), show_default=True,
              help="a base whose head is tied to its embedding, when the adapter trained one side (or both "
              "apart): auto unties unless both got the same update, keep forces one shared tensor, untie "
              "always writes the head as its own tensor")
@click.option("--transformer", default="transformer", show_default=True,
              type=click.Choice(["transformer", "transformer_2", "both"]),
              help="a DiT LoRA into this transformer of a diffusers folder (Wan 2.2 A14B: transformer_2 is the "
              "low-noise expert)")
@click.option("--reference", default=None, type=click.Path(),
              help="with an .onnx --base: the HF folder it was exported from, to find weights by value when the "
              "exporter renamed them")
def merge_cmd(base, adapters, weights, out, dtype, device, shard_size, quantize, double_quant, blocksize,
              fp16_base, adapter_format, strict, overwrite, as_json, adapter_dir, jobs_file, executor, scheduler,
              n_workers, jsonl, fail_on_nonfinite, no_manifest, rehash_inputs, allow_incomplete, force, tie_embeddings,
              transformer,
              reference):
    """Merge one or more adapters into a base model: W' = W + Σ wᵢ·ΔWᵢ, computed in fp32, rounded once."""
    import loraport
    from rich.markup import escape

    from loraport.errors import BadInputError

    nonfinite = "fail" if fail_on_nonfinite else "warn"
    qopts = _quant_options(quantize, double_quant, blocksize, dtype)
    batch_only = {"--executor": executor, "--scheduler": scheduler, "--workers": n_workers, "--jsonl": jsonl}
    if (adapter_dir or jobs_file) and transformer != "transformer":
        raise BadInputError("--transformer applies to a single merge (a batch merges into the transformer)")
    if adapter_dir or jobs_file:
        run_on = _executor(executor, scheduler, n_workers)
        _batch(base, adapters, weights, out, adapter_dir, jobs_file, "jsonl" if jsonl else as_json, run_on,
               adapter_format=adapter_format,
               dtype=dtype, device=device, shard_size=parse_size(shard_size) if shard_size else None,
               overwrite=overwrite, quantize=quantize, quant_options=qopts, strict=strict, fp16_base=fp16_base,
               nonfinite=nonfinite,
               manifest=not no_manifest, hash_cache=not rehash_inputs, allow_incomplete=allow_incomplete,
               tie_embeddings=tie_embeddings)
        return
    if any(batch_only.values()):
        raise BadInputError(f"{', '.join(k for k, v in batch_only.items() if v)} only apply to a batch "
                            "(--jobs or --adapter-dir)")
    if not base:
        raise BadInputError("--base is required")
    if not adapters:
        raise BadInputError("--adapter is required (or --adapter-dir / --jobs for a batch)")
    if not out:
        raise BadInputError("--out is required")
    check_weights(weights, len(adapters))
    ws = list(weights) or [1.0] * len(adapters)
    result = loraport.merge(base, list(zip(adapters, ws)), out, dtype=dtype, device=device,
                            shard_size=parse_size(shard_size) if shard_size else None,
                            overwrite=overwrite, quantize=quantize, quant_options=qopts, strict=strict,
                            adapter_format=adapter_format, fp16_base=fp16_base, nonfinite=nonfinite,
                            manifest=not no_manifest, reference=reference, hash_cache=not rehash_inputs,
                            allow_incomplete=allow_incomplete, force=force, tie_embeddings=tie_embeddings,
                            transformer=transformer)  # progress: the reporter the CLI installed (stderr)
    report = result.to_dict()
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
    if str(base).endswith(".gguf"):  # validate runs torch / onnxruntime artifacts, not GGUF (llama.cpp's)
        return
    if not str(base).endswith(".onnx") or reference:  # a baked ONNX model is validated against its HF folder
        err.print(next_validate(report["out"], reference or base, list(zip(adapters, ws))), markup=False)


def check_weights(weights, n: int, flag: str = "--weight") -> None:
    """One weight per adapter, or none (1.0 each): a count in between is a typo, never silently padded."""
    from loraport.errors import BadInputError

    if weights and len(weights) != n:
        raise BadInputError(f"{len(weights)} {flag} value(s) for {n} adapter(s); give one per adapter (in the "
                            "same order) or none for 1.0 each")


def _quant_options(quantize, double_quant: bool, blocksize, dtype: str) -> dict:
    """The quantizer's options; options that would do nothing with the chosen --quantize are refused."""
    from loraport.errors import BadInputError

    four_bit = quantize in ("nf4", "fp4")
    if double_quant and not four_bit:
        raise BadInputError("--double-quant applies to --quantize nf4 or fp4 (it quantizes their absmax statistics)"
                            + (f"; --quantize {quantize} has none" if quantize else ""))
    if blocksize is not None and not four_bit:
        raise BadInputError("--blocksize applies to --quantize nf4 or fp4")
    if quantize in ("fp16", "bf16", "fp32") and dtype not in ("auto", quantize):
        raise BadInputError(f"--quantize {quantize} casts every float tensor to {quantize}; --dtype {dtype} "
                            "contradicts it (drop one)")
    if not four_bit:
        return {}
    return {"blocksize": 64 if blocksize is None else blocksize, "double_quant": double_quant}


def _executor(executor, scheduler, n_workers):
    from loraport.errors import BadInputError

    if executor == "local" and (scheduler or n_workers):
        raise BadInputError("--scheduler / --workers apply to --executor dask")
    if scheduler and n_workers:
        raise BadInputError("--workers sizes the cluster loraport starts; with --scheduler the cluster is yours")
    if executor != "dask" and not scheduler:
        if n_workers:
            raise BadInputError("--workers applies to --executor dask")
        return None
    from loraport.executors import DaskExecutor

    return DaskExecutor(scheduler, n_workers)


def _batch(base, adapters, weights, out, adapter_dir, jobs_file, as_json, executor, adapter_format=None,
           **merge_options):
    """--adapter-dir / --jobs: one job per adapter or entry, continuing past failures; exit 1 if any failed.
    `as_json`: True (one document at the end), "jsonl" (a line per job as it ends, then a summary) or False."""
    import sys
    from pathlib import Path

    from loraport import hub
    from loraport.batch import check_bases, jobs_from_dir, jobs_from_file, run_jobs, summary
    from loraport.errors import BadInputError

    if adapter_dir and jobs_file:
        raise BadInputError("give either --adapter-dir or --jobs, not both")
    if adapters or weights:
        raise BadInputError("--adapter/--weight cannot be combined with --adapter-dir or --jobs")
    base = None if base is None else str(hub.resolve(base, "base"))
    if adapter_dir:
        if not out:
            raise BadInputError("--adapter-dir needs --out (the folder that receives one output per adapter)")
        if base is None:
            raise BadInputError("--base is required")
        jobs = jobs_from_dir(adapter_dir, out, adapter_format)  # refuses colliding names: nothing written yet
        Path(out).mkdir(parents=True, exist_ok=True)
    else:
        jobs = jobs_from_file(jobs_file, base)
        check_bases(jobs, f"--jobs {jobs_file}")
    results = run_jobs(base, jobs, on_result=_shower(as_json), executor=executor, adapter_format=adapter_format,
                       **merge_options)
    total = summary(results)
    if as_json == "jsonl":
        emit_json({"summary": total}, compact=True)
    elif as_json:
        emit_json({"jobs": [r.as_dict() for r in results], **total})
    else:
        skipped = f", {total['skipped']} already done" if total["skipped"] else ""
        err.print(f"{total['ok']} of {len(results)} job(s) succeeded{skipped}")
    if total["failed"]:
        sys.exit(1)


def _shower(as_json):
    from rich.markup import escape

    def show(r):
        if as_json == "jsonl":
            emit_json(r.as_dict(), compact=True)
        elif not as_json:
            if r.status == "skipped":
                err.print(f"[green]done[/green]  {escape(r.name)} → {escape(r.out)} (verified, skipped)", markup=True)
            elif r.ok:
                err.print(f"[green]ok[/green]    {escape(r.name)} → {escape(r.out)} ({r.seconds:.1f}s)", markup=True)
                for w in r.report.get("warnings", []) or []:
                    err.print(f"      [yellow]warning:[/yellow] {escape(w)}", markup=True)
            else:
                err.print(f"[red]FAIL[/red]  {escape(r.name)}: {escape(r.error)}", markup=True)

    return show
