"""Capture an ONNX graph of a transformers decoder without touching its weights.

The model is built from the base folder's config.json with every parameter on the `meta` device (no storage),
its small computed buffers (rotary `inv_freq`, ...) kept as real values, and traced with
`torch.onnx.export(dynamo=True, optimize=False)` on meta inputs. `optimize=False` keeps the initializer names
equal to the model's parameter names, which is what lets the weights be streamed in afterwards by name.
The result is a `Captured`: the graph as an `onnx.ModelProto` with *no* initializers, plus the list of
initializers it expects (name, ONNX dtype, shape) and the buffer values.
"""

from __future__ import annotations

import contextlib
import re
import inspect
import logging
import warnings

import onnx
import torch

from loraport.errors import BadInputError
from loraport.onnx.captured import Captured, InitSpec, LoraSlot
from loraport.onnx.replicate import layer_count_key, replicate_layers, uniform_layers
from loraport.remote_code import NO_REMOTE_CODE, no_prompt, refuse_remote_code

# Families the export is tested on (model_type -> title). Other decoder LMs that transformers defines are
# attempted too, with a note in the report.
TESTED_FAMILIES: dict[str, str] = {
    "llama": "Llama",  # Llama 2/3, TinyLlama
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "phi3": "Phi-3",
    "gpt2": "GPT-2",  # Conv1D weights stored [in, out]
}

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@contextlib.contextmanager
def _params_on_meta():
    """Register every new nn.Parameter on the meta device; buffers stay real (they are computed, small)."""
    orig = torch.nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        orig(self, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = orig


def _transformers():
    try:
        import transformers
    except ImportError:
        raise BadInputError("ONNX export needs transformers: pip install transformers") from None
    return transformers


def build_skeleton(config: dict, dtype: str = "fp32"):
    """The causal-LM module for `config` with meta parameters and real buffers, in eval mode."""
    tf = _transformers()
    mt = config.get("model_type") if isinstance(config, dict) else None
    if not mt:
        raise BadInputError("base config.json has no model_type; ONNX export needs a transformers model folder")
    refuse_remote_code(config, "base")
    try:
        cfg = tf.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"transformers cannot build a config for model_type {mt!r}: {e}") from None
    cfg.use_cache = False
    if hasattr(cfg, "_attn_implementation"):
        cfg._attn_implementation = "eager"
    tdt = TORCH_DTYPES[dtype]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(tdt)
    try:
        with _params_on_meta(), warnings.catch_warnings(), no_prompt():
            warnings.simplefilter("ignore")
            key = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
            model = tf.AutoModelForCausalLM.from_config(cfg, **NO_REMOTE_CODE, **{key: tdt})
    except ValueError as e:
        raise BadInputError(f"model_type {mt!r} is not a causal LM transformers can build: {e}") from None
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def add_lora_slots(model, targets: dict[str, tuple[int, int]], rank: int = 2) -> list[LoraSlot]:
    """Attach y += (x @ A) @ B to each target module (a forward hook), A/B meta parameters named
    `<module>.lora_A.weight` / `<module>.lora_B.weight` in MatMul layout. `targets`: weight name -> (in, out)."""
    modules = dict(model.named_modules())
    slots = []
    for target, (d_in, d_out) in sorted(targets.items()):
        mod_name = target[: -len(".weight")] if target.endswith(".weight") else target
        mod = modules.get(mod_name)
        if mod is None or not hasattr(mod, "weight"):
            raise BadInputError(f"multi-LoRA: {target} is not the weight of a module of this model")
        if isinstance(mod, torch.nn.Embedding):
            raise BadInputError(f"multi-LoRA: {target} is an embedding; embedding LoRA needs a merged export")
        for part, shape in (("lora_A", (d_in, rank)), ("lora_B", (rank, d_out))):
            holder = torch.nn.Module()
            holder.register_parameter("weight", torch.nn.Parameter(torch.empty(shape, device="meta",
                                                                               dtype=mod.weight.dtype)))
            mod.add_module(part, holder)
        mod.register_forward_hook(_lora_hook)
        slots.append(LoraSlot(mod_name, target, d_in, d_out))
    return slots


def _lora_hook(mod, args, out):
    x = args[0]
    return out + (x @ mod.lora_A.weight) @ mod.lora_B.weight


def _forward_inputs(model) -> list[str]:
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "position_ids" in params:
        names.append("position_ids")
    return names


def capture(config: dict, dtype: str = "fp32", opset: int = 20, lora_targets: dict | None = None,
            with_past: bool = False, replicate: bool = True) -> Captured:
    """Trace the model for `config` once, weights-free. `lora_targets` (weight name -> (in, out)) adds
    multi-LoRA branches. With `replicate`, a model whose decoder layers are all alike is traced with two
    layers and layer 1's subgraph is cloned for the rest (tracing cost no longer grows with depth).
    `with_past` adds the KV-cache inputs/outputs of loraport/onnx/past.py (cloned per layer too)."""
    key = layer_count_key(config)
    n_layers = int(config.get(key) or 0) if key else 0
    if replicate and n_layers > 2 and uniform_layers(config):
        small = _two_layer_targets(lora_targets, n_layers) if lora_targets else None
        if not lora_targets or small is not None:
            cap = _capture(_with_layers(config, key, 2), dtype, opset, small, with_past)
            if replicate_layers(cap, n_layers):
                cap.notes.append(f"traced 2 of {n_layers} identical decoder layers; layer 1 cloned for the rest")
                return cap
    return _capture(config, dtype, opset, lora_targets, with_past)


_LAYER = re.compile(r"^(.*?(?:layers|h|blocks))\.(\d+)\.(.+)$")


def _two_layer_targets(targets: dict, n_layers: int) -> dict | None:
    """LoRA targets for a 2-layer trace when layers 1..L-1 carry the same slots (else None: trace in full)."""
    per: dict[int, dict[str, tuple]] = {}
    other = {}
    for t, dims in targets.items():
        m = _LAYER.match(t)
        if m:
            per.setdefault(int(m.group(2)), {})[m.group(1) + "|" + m.group(3)] = dims
        else:
            other[t] = dims
    first = per.get(1)
    if not first or any(per.get(i) != first for i in range(1, n_layers)):
        return None
    small = dict(other)
    for i in (0, 1):
        for k, dims in per.get(i, {}).items():
            pre, rest = k.split("|", 1)
            small[f"{pre}.{i}.{rest}"] = dims
    return small


def _with_layers(config: dict, key: str, n: int) -> dict:
    c = dict(config)
    c[key] = n
    if isinstance(c.get("layer_types"), list):
        c["layer_types"] = c["layer_types"][:n]
    return c


def _capture(config: dict, dtype: str, opset: int, lora_targets: dict | None, with_past: bool = False) -> Captured:
    model = build_skeleton(config, dtype)
    slots = add_lora_slots(model, lora_targets) if lora_targets else []
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to("meta")
    names = _forward_inputs(model)
    b, s = 2, 7
    example = {
        "input_ids": torch.zeros(b, s, dtype=torch.int64, device="meta"),
        "attention_mask": torch.ones(b, s, dtype=torch.int64, device="meta"),
        "position_ids": torch.zeros(b, s, dtype=torch.int64, device="meta"),
    }
    args, kwargs = (), {n: example[n] for n in names}
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    in_names, out_names = list(names), ["logits"]
    if with_past:
        from loraport.onnx import past

        key = layer_count_key(config)
        n_layers = int(config.get(key) or 0) if key else 0
        if n_layers < 1:
            raise BadInputError("--with-past: config.json does not say how many decoder layers the model has")
        with_pos = "position_ids" in names
        shapes = past.kv_shapes(model, n_layers)
        past.install_past_forward(model, n_layers, with_pos)
        args, dyn = past.trace_inputs(shapes, TORCH_DTYPES[dtype], with_pos)
        kwargs = None
        in_names += past.past_names(n_layers)
        out_names += past.present_names(n_layers)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_Null()), _no_stack_traces():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, input_names=in_names,
                                     output_names=out_names, dynamic_shapes=dyn, opset_version=opset,
                                     optimize=False, verbose=False)
    except Exception as e:  # the exporter raises many types; one line is what a user can act on
        raise BadInputError(f"torch.onnx could not capture model_type {config.get('model_type')!r}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    graph = prog.model.graph
    inits = []
    for name, v in graph.initializers.items():
        if name not in params and name not in buffers:
            raise BadInputError(f"captured graph has an initializer {name!r} that is neither a parameter nor a "
                                "buffer; this architecture cannot be exported weights-free")
        inits.append(InitSpec(name, int(v.dtype.value), tuple(int(d) for d in v.shape)))
    graph.initializers.clear()
    import onnx_ir as ir

    proto = ir.serde.serialize_model(prog.model)
    del proto.graph.initializer[:]
    _strip_debug_metadata(proto)
    if with_past:
        past.name_axes(proto, n_layers)
        if [i.name for i in proto.graph.input] != in_names or [o.name for o in proto.graph.output] != out_names:
            raise BadInputError(f"--with-past: the captured graph of model_type {config.get('model_type')!r} "
                                "does not have the expected KV-cache inputs/outputs")
    notes = []
    mt = str(config.get("model_type"))
    if mt not in TESTED_FAMILIES:
        notes.append(f"model_type {mt!r} is not in loraport's tested families; validate the result")
    return Captured(proto, inits, {k: v for k, v in buffers.items() if any(i.name == k for i in inits)},
                    in_names, mt, notes, slots, out_names, with_past)


@contextlib.contextmanager
def _no_stack_traces():
    """Trace without recording a Python stack per FX node (torch.fx.config.do_not_emit_stack_traces): the
    stack traces are stripped from the graph anyway, and collecting them loads every source file on the stack
    into `linecache` (~5 MB resident at the capture's peak, measured on the 220M bench model)."""
    cfg = getattr(getattr(torch, "fx", None), "config", None)
    if cfg is None or not hasattr(cfg, "do_not_emit_stack_traces"):
        yield
        return
    prev = cfg.do_not_emit_stack_traces
    cfg.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        cfg.do_not_emit_stack_traces = prev


# node metadata the exporter adds for debugging; dropped (they are most of the .onnx file's size). The module
# scopes (`pkg.torch.onnx.name_scopes`) are kept: they let `bake` find weights in graphs whose names were lost.
_DEBUG_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy", "namespace")


def _strip_debug_metadata(proto: onnx.ModelProto) -> None:
    for n in proto.graph.node:
        keep = [p for p in n.metadata_props if p.key not in _DEBUG_KEYS]
        if len(keep) != len(n.metadata_props):
            del n.metadata_props[:]
            n.metadata_props.extend(keep)


class _Null:
    def write(self, s):
        return len(s)

    def flush(self):
        pass
