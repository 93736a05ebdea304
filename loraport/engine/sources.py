"""Sources: the base layouts a merge reads, chosen by a registry when a base is opened; each serves canonical
tensor names, shapes, dtypes and one tensor at a time (`loraport.checkpoint.Checkpoint`'s interface: names,
info, get, raw, span, release, layer_hint, resolve, extra_files).

* The safetensors layouts — HF model folder, diffusers pipeline folder, single .safetensors file — are told
  apart by `Checkpoint.open`.
* A layered source wraps that view when it recognizes the base: bitsandbytes (served dequantized by
  loraport.quant, or replaced by the --fp16-base it was made from), fp8 (float8 weights with their scales,
  loraport.quant.fp8_checkpoint), MXFP4 (gpt-oss `*_blocks` + `*_scales`, loraport.quant.mxfp4_checkpoint); a
  quant_method none of them reads is refused. Register one with
  `@layered(name, claims)`.
* An .onnx base is baked by loraport.onnx: its initializers are the source (loraport/onnx/initializers.py)
  and ONNX external data the sink of the same stream; `loraport.api.run_merge` chooses it and refuses the options
  baking cannot honour.

Name fall-backs live here: `resolve_target` matches an adapter target to base tensors (prefix variants here,
tied embeddings in `Checkpoint.resolve`); `parameter_tensor` finds the tensor holding a parameter of the model
built from config.json (the ONNX export's names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError


@dataclass(frozen=True)
class BaseOptions:
    """How the base is to be opened (what a layered source may need)."""
    fp16_base: str | Path | None = None  # the 16-bit original of a quantized base
    quantize: str | None = None  # the output's quantization (a quantized base warns on re-quantizing)


@dataclass(frozen=True)
class Layered:
    name: str
    claims: Callable[[Checkpoint, BaseOptions], bool]
    open: Callable[[Checkpoint, BaseOptions], Checkpoint]


LAYERED: list[Layered] = []


def layered(name: str, claims: Callable[[Checkpoint, BaseOptions], bool]):
    """Register a source that wraps the plain safetensors view of a base it claims (first claim wins)."""
    def deco(fn: Callable[[Checkpoint, BaseOptions], Checkpoint]):
        LAYERED.append(Layered(name, claims, fn))
        return fn
    return deco


def _is_bnb(ckpt: Checkpoint, opts: BaseOptions) -> bool:
    qc = ckpt.config.get("quantization_config") if isinstance(ckpt.config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" or opts.fp16_base is not None


@layered("bitsandbytes", _is_bnb)
def _open_bnb(ckpt: Checkpoint, opts: BaseOptions) -> Checkpoint:
    try:
        from loraport.quant.bnb_checkpoint import open_quantized_base
    except ImportError:
        raise BadInputError(f"{ckpt.root}: a bitsandbytes-quantized base is not supported by this installation") \
            from None
    return open_quantized_base(ckpt, fp16_base=opts.fp16_base, quantize=opts.quantize)


def _is_fp8(ckpt: Checkpoint, opts: BaseOptions) -> bool:
    from loraport.quant.fp8_checkpoint import has_fp8

    return has_fp8(ckpt)


@layered("fp8", _is_fp8)
def _open_fp8(ckpt: Checkpoint, opts: BaseOptions) -> Checkpoint:
    from loraport.quant.fp8_checkpoint import Fp8Checkpoint

    return Fp8Checkpoint.from_checkpoint(ckpt)


def _is_mxfp4(ckpt: Checkpoint, opts: BaseOptions) -> bool:
    from loraport.quant.mxfp4_checkpoint import has_mxfp4

    return has_mxfp4(ckpt)


@layered("mxfp4", _is_mxfp4)
def _open_mxfp4(ckpt: Checkpoint, opts: BaseOptions) -> Checkpoint:
    from loraport.quant.mxfp4_checkpoint import Mxfp4Checkpoint

    return Mxfp4Checkpoint.from_checkpoint(ckpt)


KNOWN_QUANT_METHODS = ("bitsandbytes", "fp8", "compressed-tensors", "mxfp4")


def _unknown_quant(ckpt: Checkpoint, opts: BaseOptions) -> bool:
    qc = ckpt.config.get("quantization_config") if isinstance(ckpt.config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") not in KNOWN_QUANT_METHODS


@layered("unknown quantization", _unknown_quant)
def _refuse_quant(ckpt: Checkpoint, opts: BaseOptions) -> Checkpoint:
    method = ckpt.config["quantization_config"].get("quant_method")
    raise BadInputError(f"{ckpt.root}: config.json says quant_method {method!r}, which loraport cannot read as a base "
                        f"(it reads {', '.join(KNOWN_QUANT_METHODS)}); merge into the unquantized model instead")


def open_base(path: str | Path, fp16_base=None, quantize: str | None = None) -> Checkpoint:
    """The base as a Checkpoint (or the layered source that claims it)."""
    opts = BaseOptions(fp16_base, quantize)
    ckpt = Checkpoint.open(path)
    for src in LAYERED:
        if src.claims(ckpt, opts):
            return src.open(ckpt, opts)
    if fp16_base is not None:
        raise BadInputError("--fp16-base is only meaningful with a quantized --base")
    return ckpt


def check_loadable(ckpt: Checkpoint) -> None:
    """Refuse a model-folder base whose merged copy transformers could not load: without config.json (or with
    one that names no model_type) from_pretrained fails. Diffusers pipelines and single files have their own
    layouts; a diffusers component folder's config names its `_class_name` instead."""
    if ckpt.kind != "hf-folder":
        return
    cfg = ckpt.root / "config.json"
    if not cfg.is_file():
        raise BadInputError(f"{ckpt.root}: no config.json, so the merged folder could not be loaded by transformers; "
                            "copy the model's config.json next to its weights, or pass --allow-incomplete to write "
                            "the weights anyway")
    if not isinstance(ckpt.config, dict) or not (ckpt.config.get("model_type") or ckpt.config.get("_class_name")):
        raise BadInputError(f"{cfg}: names no model_type, so the merged folder could not be loaded by transformers; "
                            "use the model's own config.json, or pass --allow-incomplete to write the weights anyway")


# Where a multimodal LLM keeps its text decoder: transformers ≥ 5 (Gemma 3, LLaVA, Mistral 3, Qwen-VL:
# `model.language_model.layers…`, head `lm_head`), transformers 4 checkpoints of LLaVA / Gemma 3 / Mistral 3
# (`language_model.model.layers…`, head `language_model.lm_head`), the text-only model (`model.layers…`).
TEXT_TOWER = ("model.language_model.", "language_model.model.", "model.")
HEAD_PREFIXES = ("", "language_model.")


def _candidates(target: str) -> list[str]:
    """A target as written, then with the "model." prefix toggled (adapters saved from the bare or the wrapped
    model), then in every spelling of a multimodal model's text tower (an adapter trained on the text-only model
    merges into the multimodal checkpoint and back, across transformers 4 and 5 layouts)."""
    out = [target, target[len("model."):] if target.startswith("model.") else "model." + target]
    for p in TEXT_TOWER:
        if target.startswith(p):
            out += [q + target[len(p):] for q in TEXT_TOWER]
            break
    else:
        for p in sorted(HEAD_PREFIXES, key=len, reverse=True):
            if target.startswith(p + "lm_head."):
                out += [q + target[len(p):] for q in HEAD_PREFIXES]
                break
    return list(dict.fromkeys(out))


def resolve_target(base: Checkpoint, target: str) -> list[str]:
    """The base tensor(s) an adapter target updates ([] when none): the first spelling the base has, with every
    saved copy of a tied weight."""
    for cand in _candidates(target):
        names = base.resolve(cand)
        if names:
            return names
    return []


def parameter_tensor(base: Checkpoint, name: str) -> str | None:
    """The base tensor that holds the model parameter `name` (a name of the model transformers builds from the
    config), or None."""
    if name in base:
        return name
    parts = name.split(".", 1)
    if len(parts) == 2 and parts[1] in base:  # checkpoints saved without the base-model prefix (GPT-2)
        return parts[1]
    for n in base.resolve(name):  # a tied head stored only as the embedding
        return n
    if name.endswith("lm_head.weight") and base.tied():
        for emb in ("model.embed_tokens.weight", "transformer.wte.weight", "wte.weight"):
            if emb in base:
                return emb
    return None
