"""`loraport convert`: an adapter in another format (no merge), or — with --to onnx / onnx-adapter — an ONNX
export (loraport/onnx)."""

from __future__ import annotations

import click

from loraport.errors import BadInputError


def register(group: click.Group) -> None:
    group.add_command(convert_cmd)


@click.command("convert")
@click.argument("adapter", required=False, type=click.Path())
@click.option("--to", "to", required=True, help="output format: a writable adapter format, onnx or onnx-adapter "
              "(`loraport formats` lists them)")
@click.option("--out", required=True, type=click.Path(), help="file or folder to write")
@click.option("--base", default=None, type=click.Path(),
              help="base model: names GGUF/torchtune/kohya targets, gives head counts for q/k permutation, and the "
                   "weights DoRA needs for --lossy")
@click.option("--format", "fmt", default=None, help="force the input format (default: detect)")
@click.option("--lossy", is_flag=True, help="allow an SVD re-factorization where the target cannot express the "
                                            "adapter exactly (error reported)")
@click.option("--rank", type=int, default=None, help="with --lossy: re-factor every update to this rank")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--read-option", "read_opts", multiple=True, metavar="KEY=VALUE",
              help="an option of the input format's reader, e.g. mlx_alpha=apply (repeatable)")
@click.option("--write-option", "write_opts", multiple=True, metavar="KEY=VALUE",
              help="an option of the output format's writer, e.g. bake=true (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
# ONNX options (issue 7): passed through to loraport.onnx.cli_convert
@click.option("--adapter", "adapters", multiple=True, type=click.Path(), help="ONNX: adapter (repeatable)")
@click.option("--weight", "weights", multiple=True, type=float, help="ONNX: weight per --adapter (repeatable)")
@click.option("--multi-lora", is_flag=True, help="ONNX: keep LoRA A/B as switchable inputs, one .onnx_adapter each")
@click.option("--graph", default=None, type=click.Path(), help="ONNX: multi-LoRA graph an .onnx_adapter is made for")
@click.option("--opset", type=int, default=None, help="ONNX: opset version")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default=None, help="ONNX: weight dtype")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None, help="ONNX: quantized weights")
@click.option("--with-past", is_flag=True, help="ONNX: KV-cache inputs/outputs for generation")
@click.option("--fail-on-nonfinite", is_flag=True, help="ONNX: refuse adapters or merged weights with NaN/Inf "
              "(default: warn), as merge does")
@click.option("--int4", "int4_opts", multiple=True, metavar="KEY=VALUE",
              help="ONNX --quantize int4: block=16..256, symmetric=true|false, search=true|false, "
                   "accuracy_level=0..4 (repeatable)")
@click.option("--recapture", is_flag=True, help="ONNX: trace the graph again instead of reading the one remembered "
              "for this architecture and these options (LORAPORT_NO_GRAPH_CACHE=1: never remember)")
def convert_cmd(adapter, to, out, base, fmt, lossy, rank, overwrite, read_opts, write_opts, as_json, adapters, weights,
                multi_lora, graph, opset, dtype, quantize, with_past, fail_on_nonfinite, recapture, int4_opts):
    """Convert ADAPTER to another format without merging: exact where the target can express it (scales
    baked into B where a format has one alpha), refused with the reason otherwise unless --lossy."""
    from loraport.console import emit_json, err

    from loraport.formats import export_targets

    _check_target(to)
    onnx_only = {"--adapter": adapters, "--weight": weights, "--multi-lora": multi_lora, "--graph": graph,
                 "--opset": opset, "--dtype": dtype, "--quantize": quantize, "--with-past": with_past,
                 "--recapture": recapture, "--fail-on-nonfinite": fail_on_nonfinite, "--int4": int4_opts}
    import loraport

    if to in export_targets():
        if read_opts or write_opts:
            raise BadInputError(f"--read-option / --write-option do not apply to --to {to} (an ONNX export)")
        from loraport.commands.merge import check_weights

        all_adapters = ([adapter] if adapter else []) + list(adapters)
        check_weights(weights, len(all_adapters))  # the same rule and words as merge, combine and validate
        rep = loraport.convert(all_adapters, to, out, weights=list(weights) or None, base=base, format=fmt,
                               lossy=lossy, rank=rank, overwrite=overwrite, graph=graph, multi_lora=multi_lora,
                               opset=opset, dtype=dtype, quantize=quantize, with_past=with_past,
                               recapture=recapture, int4=_int4(int4_opts),
                               **({"nonfinite": "fail"} if fail_on_nonfinite else {})).to_dict()
    else:
        used = [k for k, v in onnx_only.items() if v]
        if used:
            raise BadInputError(f"{', '.join(used)} only apply to --to {' / '.join(export_targets())}")
        if not adapter:
            raise BadInputError("missing ADAPTER (the adapter to convert)")
        ropts, wopts = _options(adapter, fmt, to, read_opts, write_opts)
        rep = loraport.convert(adapter, to, out, base=base, format=fmt, lossy=lossy, rank=rank, overwrite=overwrite,
                               read_options=ropts, write_options=wopts).to_dict()
    if as_json:
        emit_json(rep)
        return
    if to == "onnx" and isinstance(rep, dict) and "external_data_bytes" in rep:
        from loraport.console import warn

        for w in rep.get("warnings") or []:  # NaN/Inf, worded and shown as merge shows them
            warn(w)
        _onnx_summary(rep, base, [a for a in [adapter, *adapters] if a], list(weights))
        return
    if not isinstance(rep, dict) or "source_format" not in rep:
        err.print(f"wrote {out}", markup=False)
        for n in rep.get("notes", []) if isinstance(rep, dict) else []:  # e.g. why no genai_config.json
            err.print(f"  note: {n}", markup=False)
        return
    err.print(f"{rep['source_format']} → {rep['to']}: {rep['deltas']} update(s) written to {rep['out']}")
    for n in rep.get("notes", []):
        err.print(f"  note: {n}")
    if rep.get("lossy"):
        err.print(f"  lossy: {len(rep['refactored'])} update(s) re-factored, max relative error "
                  f"{rep['max_rel_error']:.3g}")
    if rep.get("max_abs_diff") is not None:
        err.print(f"  read back: max |ΔW difference| {rep['max_abs_diff']:.3g}")


def _onnx_summary(rep: dict, base, adapters: list[str], weights: list[float]) -> None:
    from loraport.console import err, human_bytes, next_validate, path_size

    what = rep.get("dtype", "") + (f", {rep['quantize']}" if rep.get("quantize") else "")
    err.print(f"exported {rep.get('model_type', '?')} ({rep.get('kind', 'merged')}, {what}) → {rep['out']} "
              f"({human_bytes(path_size(rep['out']))}, {rep['seconds']:.1f}s on {rep.get('device', '?')}; "
              f"graph from {rep.get('graph', 'capture')})", markup=False)
    ws = weights if len(weights) == len(adapters) else [1.0] * len(adapters)
    err.print(next_validate(rep["out"], base, list(zip(adapters, ws))), markup=False)


def _check_target(to: str) -> None:
    from loraport.formats import convert_targets

    targets = convert_targets()
    if to not in targets:
        raise BadInputError(f"unknown --to {to!r}; choose one of {', '.join(sorted(targets))}")


def _options(adapter, fmt, to, read_opts, write_opts) -> tuple[dict, dict]:
    """--read-option / --write-option KEY=VALUE, typed by the options the reader / writer declares (the input's
    format is detected here when not forced, so its reader's options can be checked before any work)."""
    from loraport.formats import detect, get_format, parse_option_text

    ropts = {}
    if read_opts:
        rfmt = get_format(fmt) if fmt else detect(adapter)
        ropts = parse_option_text(rfmt.read_options, list(read_opts), rfmt.name, "read")
    wfmt = get_format(to)
    return ropts, parse_option_text(wfmt.write_options, list(write_opts), wfmt.name, "write")


def _int4(opts) -> dict | None:
    """--int4 KEY=VALUE pairs as export_onnx's int4 dict (values: integers, true/false)."""
    out: dict = {}
    for o in opts:
        key, sep, val = o.partition("=")
        if not sep or not key:
            raise BadInputError(f"--int4 {o!r}: expected KEY=VALUE (e.g. block=64)")
        low = val.strip().lower()
        if low in ("true", "false"):
            out[key.strip()] = low == "true"
        elif low.lstrip("-").isdigit():
            out[key.strip()] = int(low)
        else:
            raise BadInputError(f"--int4 {o!r}: the value must be an integer or true/false")
    return out or None
