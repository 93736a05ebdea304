"""KV-cache inputs/outputs (`--with-past`): the graph layout generation runtimes expect, and the module traced.

Layout (the names optimum / onnxruntime-genai use), for L decoder layers:

    inputs   input_ids                 [batch, sequence]                        int64
             attention_mask            [batch, past_sequence + sequence]        int64 (1 = attend, 0 = padding)
             position_ids              [batch, sequence]                        int64 (where the model takes it)
             past_key_values.{i}.key   [batch, kv_heads, past_sequence, head_dim]
             past_key_values.{i}.value [batch, kv_heads, past_sequence, head_dim]
    outputs  logits                    [batch, sequence, vocab]
             present.{i}.key           [batch, kv_heads, past_sequence + sequence, head_dim]
             present.{i}.value         [batch, kv_heads, past_sequence + sequence, head_dim]

The first step feeds past tensors with past_sequence = 0. transformers 5's cache is a Python object; the
traced forward (`install_past_forward`) takes the past as flat tensors, builds a `DynamicCache` from them inside forward
(a full-length cache even for sliding-window models: the window is applied by the attention mask), runs the
model with `use_cache=True` and returns the logits and each layer's concatenated keys/values.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from loraport.errors import BadInputError

PAST = "past_key_values.{i}.{kv}"
PRESENT = "present.{i}.{kv}"
KV = ("key", "value")
# axis names of the symbolic dims; TOTAL is the name the exporter gives present's length (past + new tokens)
BATCH, SEQ, PAST_SEQ = "batch", "sequence", "past_sequence"
TOTAL = "past_sequence + sequence"
# trace sizes: all distinct and >= 2 so torch.export keeps every axis symbolic (0/1 would be specialized);
# onnxruntime then runs the graph with past_sequence = 0 as well (tested)
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 5, 3


def past_names(n_layers: int) -> list[str]:
    return [PAST.format(i=i, kv=kv) for i in range(n_layers) for kv in KV]


def present_names(n_layers: int) -> list[str]:
    return [PRESENT.format(i=i, kv=kv) for i in range(n_layers) for kv in KV]


def _cache_kwarg(model) -> str:
    """The forward keyword the cache goes in: `cache` in transformers >= 5.2x, `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    for k in ("cache", "past_key_values"):
        if k in params:
            return k
    raise BadInputError(f"{type(model).__name__}.forward takes no KV cache; export it without --with-past")


def _layer_kv(cache, i: int):
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers 5
        return layers[i].keys, layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def _cache_len(cache) -> int:
    layers = getattr(cache, "layers", None)
    return len(layers) if layers is not None else len(cache.key_cache)


def kv_shapes(model, n_layers: int) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of each decoder layer's cache, read from a one-token forward pass on the meta
    device (no compute, no storage) rather than from config keys each family spells differently."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    one = torch.zeros(1, 1, dtype=torch.int64, device="meta")
    kw = {"input_ids": one, "attention_mask": torch.ones_like(one), _cache_kwarg(model): cache, "use_cache": True}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kw["position_ids"] = one
    try:
        with torch.no_grad():
            model(**kw)
    except Exception as e:  # noqa: BLE001 - any failure means this family's cache is not the plain layout
        raise BadInputError(f"--with-past: cannot run {type(model).__name__} with a KV cache "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if type(cache) is not DynamicCache or _cache_len(cache) != n_layers:
        raise BadInputError(f"--with-past: {type(model).__name__} keeps {_cache_len(cache)} cache layers for "
                            f"{n_layers} decoder layers (shared or non-attention layers); not supported")
    shapes = []
    for i in range(n_layers):
        k, v = _layer_kv(cache, i)
        if k is None or v is None or k.dim() != 4 or tuple(k.shape) != tuple(v.shape) or k.shape[2] != 1:
            raise BadInputError(f"--with-past: layer {i} of {type(model).__name__} does not cache keys/values "
                                "as [batch, heads, sequence, head_dim]; not supported")
        shapes.append((int(k.shape[1]), int(k.shape[3])))
    return shapes


def install_past_forward(model, n_layers: int, with_position_ids: bool) -> None:
    """Replace `model.forward` (on this instance only) by (input_ids, attention_mask, [position_ids], *past)
    -> (logits, *present), past/present flat per layer as (key, value). Patching the instance rather than
    wrapping it keeps the parameter names — the initializer names the weights are streamed under — unchanged."""
    orig = model.forward
    cache_kwarg = _cache_kwarg(model)

    def forward(input_ids, attention_mask, *rest):
        from transformers.cache_utils import DynamicCache

        position_ids = rest[0] if with_position_ids else None
        past = rest[1:] if with_position_ids else rest
        cache = DynamicCache()
        for i in range(n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kw = {"input_ids": input_ids, "attention_mask": attention_mask, cache_kwarg: cache, "use_cache": True}
        if position_ids is not None:
            kw["position_ids"] = position_ids
        logits = orig(**kw).logits
        present = []
        for i in range(n_layers):
            present.extend(_layer_kv(cache, i))
        return (logits, *present)

    model.forward = forward


def trace_inputs(shapes: list[tuple[int, int]], float_dtype: torch.dtype, with_position_ids: bool):
    """Example args (meta tensors) and the matching dynamic_shapes for tracing `install_past_forward`'s forward."""
    b, s, p = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    ids = torch.zeros(b, s, dtype=torch.int64, device="meta")
    mask = torch.ones(b, s + p, dtype=torch.int64, device="meta")
    rest, rest_dyn = [], []
    if with_position_ids:
        rest.append(torch.zeros(b, s, dtype=torch.int64, device="meta"))
        rest_dyn.append({0: BATCH, 1: SEQ})
    for h, d in shapes:
        for _ in KV:
            rest.append(torch.zeros(b, h, p, d, dtype=float_dtype, device="meta"))
            rest_dyn.append({0: BATCH, 2: PAST_SEQ})
    args = (ids, mask, *rest)
    dyn = ({0: BATCH, 1: SEQ}, {0: BATCH, 1: "total_sequence"}, tuple(rest_dyn))
    return args, dyn


def name_axes(proto, n_layers: int) -> None:
    """Give attention_mask's length axis the same name as present's (`past_sequence + sequence`), so the
    graph documents that the mask covers past and new tokens."""
    wanted = {"attention_mask": {1: TOTAL}}
    for vi in proto.graph.input:
        for ax, name in wanted.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[ax]
            if dim.dim_param:
                dim.dim_param = name
    for vi in proto.graph.output:
        if vi.name.startswith("present."):
            dim = vi.type.tensor_type.shape.dim[2]
            if dim.dim_param:
                dim.dim_param = TOTAL


# ------------------------------------------------------------------------------------------ runtime side
ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(bfloat16)": np.float32}


def past_inputs(session_inputs) -> list:
    """The `past_key_values.*` inputs of an onnxruntime session (NodeArg list), in graph order."""
    return [i for i in session_inputs if i.name.startswith("past_key_values.")]


def empty_past(session_inputs, batch: int) -> dict[str, np.ndarray]:
    """Feeds for a first step: every past input with past_sequence = 0."""
    out = {}
    for i in past_inputs(session_inputs):
        shape = list(i.shape)
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise BadInputError(f"graph input {i.name} has shape {shape}; expected [batch, heads, past, head_dim]")
        dt = ORT_TO_NUMPY.get(i.type)
        if dt is None:
            raise BadInputError(f"graph input {i.name} has type {i.type}; expected a float tensor")
        out[i.name] = np.zeros((batch, shape[1], 0, shape[3]), dtype=dt)
    return out


def present_to_past(output_names: list[str], outputs: list) -> dict[str, np.ndarray]:
    """Map a step's `present.*` outputs to the next step's `past_key_values.*` feeds."""
    return {"past_key_values." + n[len("present."):]: v for n, v in zip(output_names, outputs)
            if n.startswith("present.")}


def step_splits(seq: int) -> list[int]:
    """Chunk ends for checking a with-past graph on `seq` tokens: a prompt of seq-2, then two single tokens."""
    return [seq] if seq < 3 else [seq - 2, seq - 1, seq]


def run_steps(run, session_inputs, output_names: list[str], feeds: dict, splits: list[int]) -> np.ndarray:
    """Run `feeds` (a whole sequence: input_ids, attention_mask, position_ids) in chunks ending at `splits`
    (e.g. [n-2, n-1, n]): the first with an empty past, each later one with the previous present as past.
    `run(feeds) -> outputs` runs one step. Returns the logits of all steps concatenated along the sequence."""
    ids = feeds["input_ids"]
    batch = ids.shape[0]
    past = empty_past(session_inputs, batch)
    logits, start = [], 0
    for end in splits:
        f = {"input_ids": ids[:, start:end], "attention_mask": feeds["attention_mask"][:, :end]}
        if "position_ids" in feeds:
            f["position_ids"] = feeds["position_ids"][:, start:end]
        f.update(past)
        outs = run(f)
        logits.append(np.asarray(outs[0]))
        past = present_to_past(output_names, outs)
        start = end
    return np.concatenate(logits, axis=1)
