"""Clone a traced decoder layer: trace a model with 2 decoder layers, then repeat layer 1's subgraph for
layers 2..L-1. Tracing cost is then independent of depth, which is most of the export time.

Layer 1's nodes are the ones whose `pkg.torch.onnx.name_scopes` metadata contains `<layers>.1`. Layer 1 must
take exactly one value from layer 0 (the hidden state) and give exactly one value to what follows (the final
norm's input); everything else it reads (rotary cos/sin, the attention mask, its own weights) is shared or
renamed. Any doubt (a node without scope, nested graphs, several carried values) leaves the full trace.
With KV-cache inputs/outputs (`--with-past`), layer 1 also reads `past_key_values.1.*` — through a small
"prologue" of Identity/Shape nodes outside the layer scopes, cloned with it — and writes the graph outputs
`present.1.*`; each clone k gets its own `past_key_values.k.*` inputs and `present.k.*` outputs.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, replace

from loraport.onnx.captured import Captured, InitSpec

SCOPES = "pkg.torch.onnx.name_scopes"
# per-layer structure switches: a model using any of these non-uniformly is traced in full
_NONUNIFORM_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "mlp_only_layers", "first_k_dense_replace",
                    "decoder_sparse_step", "cross_attention_layers", "no_rope_layers", "sliding_window_pattern")


def layer_count_key(config: dict) -> str | None:
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(k), int):
            return k
    return None


def uniform_layers(config: dict) -> bool:
    lt = config.get("layer_types")
    if isinstance(lt, list) and len(set(map(str, lt))) > 1:
        return False
    if config.get("use_sliding_window") and config.get("max_window_layers") not in (None, 0):
        return False
    return not any(config.get(k) for k in _NONUNIFORM_KEYS)


def _scopes(node) -> list[str] | None:
    for p in node.metadata_props:
        if p.key == SCOPES:
            try:
                v = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            return v if isinstance(v, list) else None
    return None


def replicate_layers(cap: Captured, n_layers: int) -> bool:
    """Extend `cap` (traced with 2 layers) to `n_layers` in place. False (and `cap` unchanged) if unsafe."""
    prefix = _layer_prefix([i.name for i in cap.inits])
    if prefix is None:
        return False
    l1 = f"{prefix}.1"
    g = cap.proto.graph
    nodes = list(g.node)
    member = _membership(nodes, f"{prefix}.0", l1)
    cut = _cut(cap, nodes, member) if member is not None else None
    if cut is None:
        return False
    clones, last_out = _clones(nodes, cut, prefix, l1, n_layers)
    after = nodes[cut.idx1[-1] + 1:]
    for n in after:
        for j, x in enumerate(n.input):
            if x == cut.cout:
                n.input[j] = last_out
    new_nodes = nodes[: cut.idx1[-1] + 1] + clones + after
    del g.node[:]
    g.node.extend(new_nodes)
    if cap.with_past:
        _add_layer_io(g.input, cut.past1, n_layers)
        _add_layer_io(g.output, cut.present1, n_layers)
        cap.input_names[:] = [i.name for i in g.input]
        cap.output_names[:] = [o.name for o in g.output]
    del g.value_info[:]
    _replicate_inits(cap, prefix, l1, n_layers)
    _replicate_slots(cap, prefix, l1, n_layers)
    return True


def _layer_prefix(names: list[str]) -> str | None:
    """The decoder layers' prefix (`model.layers`): the first `<p>.1.` name for which `<p>.0.` names exist."""
    for n in names:
        m = re.match(r"^(.+)\.1\.", n)
        if m and any(x.startswith(m.group(1) + ".0.") for x in names):
            return m.group(1)
    return None


def _membership(nodes, l0: str, l1: str) -> list[int] | None:
    """Per node: 1 in layer 1, 0 in layer 0, -1 elsewhere; None when a node has no scope or a layer node
    holds a subgraph."""
    member = []
    for n in nodes:
        s = _scopes(n)
        if s is None:
            return None
        member.append(1 if l1 in s else 0 if l0 in s else -1)
        if any(a.type in (5, 10) for a in n.attribute) and member[-1] >= 0:  # GRAPH / GRAPHS attributes
            return None
    return member


@dataclass
class _Cut:
    """Layer 1 as a block to clone: its nodes (`idx1`) and prologue (`pro`), what it produces, the one value it
    takes from layer 0 (`cin`) and gives to what follows (`cout`), its KV-cache inputs and outputs."""

    idx1: list[int]
    pro: list[int]
    produced: set[str]
    cin: str
    cout: str
    past1: list[str]
    present1: list[str]


def _cut(cap: Captured, nodes, member: list[int]) -> _Cut | None:
    g = cap.proto.graph
    idx1 = [i for i, m in enumerate(member) if m == 1]
    if not idx1:
        return None
    produced1 = {o for i in idx1 for o in nodes[i].output if o}
    # constants the exporter deduplicated across layers are shared, not carried
    produced0 = {o for i, m in enumerate(member) if m == 0 and not (nodes[i].op_type == "Constant"
                                                                    and not nodes[i].input)
                 for o in nodes[i].output if o}
    carry_in = {x for i in idx1 for x in nodes[i].input if x and x not in produced1 and x in produced0}
    used_outside = {x for i, m in enumerate(member) if m != 1 for x in nodes[i].input}
    graph_outs = {o.name for o in g.output}
    # KV cache (--with-past): layer 1 reads past_key_values.1.* (through a few shape/identity nodes outside the
    # layer scopes: its "prologue") and writes present.1.*, which are graph outputs
    past1 = [f"past_key_values.1.{kv}" for kv in ("key", "value")] if cap.with_past else []
    present1 = [f"present.1.{kv}" for kv in ("key", "value")] if cap.with_past else []
    if cap.with_past and (not set(past1) <= {i.name for i in g.input} or not set(present1) <= graph_outs
                          or not set(present1) <= produced1 or set(present1) & used_outside):
        return None
    pro = _prologue(nodes, member, set(past1), idx1[0])
    if pro is None:
        return None
    produced_pro = {o for i in pro for o in nodes[i].output if o}
    carry_out = {o for o in produced1 if (o in used_outside or o in graph_outs) and o not in present1}
    if len(carry_in) != 1 or len(carry_out) != 1 or carry_out & graph_outs:
        return None
    if idx1 != list(range(idx1[0], idx1[-1] + 1)):
        return None  # layer 1 must be one contiguous block in topological order
    (cin,), (cout,) = carry_in, carry_out
    return _Cut(idx1, pro, produced1 | produced_pro, cin, cout, past1, present1)


def _clones(nodes, cut: _Cut, prefix: str, l1: str, n_layers: int) -> tuple[list, str]:
    """Layer 1's prologue and nodes cloned for layers 2..L-1, each fed by the previous one; (clones, the last
    clone's output)."""
    scope_re = re.compile(r"'" + re.escape(l1) + r"(?=['.])")
    clones = []
    prev_out = cut.cout
    for k in range(2, n_layers):
        ren = {o: f"{o}__layer{k}" for o in cut.produced}
        ren.update({p: p.replace(".1.", f".{k}.", 1) for p in cut.past1 + cut.present1})
        for i in cut.pro + cut.idx1:
            clones.append(_clone(nodes[i], k, cut.cin, prev_out, ren, prefix, l1, scope_re))
        prev_out = ren[cut.cout]
    return clones, prev_out


def _clone(src, k: int, cin: str, prev_out: str, ren: dict[str, str], prefix: str, l1: str, scope_re):
    n = type(src)()
    n.CopyFrom(src)
    n.name = f"{src.name}__layer{k}" if src.name else ""
    for j, x in enumerate(n.input):
        if x == cin:
            n.input[j] = prev_out
        elif x in ren:
            n.input[j] = ren[x]
        elif x.startswith(l1 + "."):
            n.input[j] = f"{prefix}.{k}." + x[len(l1) + 1:]
    for j, o in enumerate(n.output):
        if o:
            n.output[j] = ren[o]
    for p in n.metadata_props:
        if p.key == SCOPES:
            p.value = scope_re.sub(f"'{prefix}.{k}", p.value)
    return n


def _replicate_inits(cap: Captured, prefix: str, l1: str, n_layers: int) -> None:
    """Layer 1's initializers (and buffers) repeated for layers 2..L-1, right after layer 1's last one."""
    layer1 = [s for s in cap.inits if s.name.startswith(l1 + ".")]
    out: list[InitSpec] = []
    for s in cap.inits:
        out.append(s)
        if layer1 and s is layer1[-1]:
            for k in range(2, n_layers):
                for s1 in layer1:
                    new = f"{prefix}.{k}." + s1.name[len(l1) + 1:]
                    out.append(InitSpec(new, s1.onnx_dtype, s1.shape))
                    if s1.name in cap.buffers:
                        cap.buffers[new] = cap.buffers[s1.name]
    cap.inits[:] = out


def _replicate_slots(cap: Captured, prefix: str, l1: str, n_layers: int) -> None:
    slots1 = [s for s in cap.lora_slots if s.module.startswith(l1 + ".")]
    for k in range(2, n_layers):
        for s in slots1:
            target = re.sub(r"((?:^|\.)(?:layers|h|blocks)\.)1\.", rf"\g<1>{k}.", s.target, count=1)
            cap.lora_slots.append(replace(s, module=f"{prefix}.{k}." + s.module[len(l1) + 1:], target=target))


def _prologue(nodes, member: list[int], roots: set[str], first1: int) -> list[int] | None:
    """Indices of the nodes outside every layer that compute only from layer 1's past inputs (`roots`) —
    the exporter's Identity/Shape nodes for layer 1's cache — in graph order; None if any of them is not
    cloneable per layer: placed after layer 1 starts, fed by a layer node, or feeding anything but layer 1
    and each other."""
    if not roots:
        return []
    vals, idx = set(roots), []
    for i, n in enumerate(nodes):
        if member[i] == -1 and any(x in vals for x in n.input):
            idx.append(i)
            vals.update(o for o in n.output if o)
    if any(i > first1 for i in idx):
        return None
    mine = set(idx)
    produced_layers = {o for i, m in enumerate(member) if m >= 0 for o in nodes[i].output}
    for i in idx:
        if any(x in produced_layers for x in nodes[i].input):
            return None
    outs = vals - roots
    for i, n in enumerate(nodes):
        if member[i] != 1 and i not in mine and any(x in outs for x in n.input):
            return None
    return idx


def _add_layer_io(values, layer1: list[str], n_layers: int) -> None:
    """Append the value infos of layers 2..L-1 (copies of layer 1's, renamed) to graph inputs or outputs."""
    src = {v.name: v for v in values}
    for k in range(2, n_layers):
        for name in layer1:
            v = type(src[name])()
            v.CopyFrom(src[name])
            v.name = name.replace(".1.", f".{k}.", 1)
            values.append(v)
