"""Module names of LyCORIS's whole-model wrapper: `lycoris.create_lycoris(module)` / `LycorisNetwork(module)`,
as SimpleTuner saves them. Every adapted layer is named `lycoris_` + its path inside the *wrapped* module with
"." → "_" (`lycoris_transformer_blocks_0_attn_to_q`, `lycoris_model_layers_0_self_attn_q_proj`).

The names are built forward from the base's own tensor names, under each place the wrapped module may sit in
the base (ROOTS), and looked up; an underscore name is never split back. One root serves a whole file: the one
under which most of its modules are found, so a file cannot mix a UNet's and a text encoder's layers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loraport.errors import BadInputError
from loraport.names.sd import Entry, SDNames, kohya_name

PREFIX = "lycoris"

# Where the wrapped module sits in a base's tensor names (in the diffusers-style module paths SDNames gives an
# original single file's UNet too), and what LyCORIS was given. The root finding most of a file's modules wins;
# a tie between two components is refused, any other goes to the first in this order. `from_sd`: the root's
# modules come from the SD name index (so an LDM single file is found through its diffusers names), else from
# the base's raw tensor names.
ROOTS: tuple[tuple[str, bool, str], ...] = (
    ("unet.",           True,  "the UNet (unet/ of a diffusers folder, or the UNet of an original single file)"),
    ("transformer.",    True,  "the transformer of a diffusers DiT folder (Flux, SD3, ...)"),
    ("text_encoder.",   True,  "the text encoder of a diffusers folder"),
    ("text_encoder_2.", True,  "the second text encoder of a diffusers folder (SDXL)"),
    ("",                False, "the whole model of the base (an HF *ForCausalLM folder, a lone diffusers component)"),
    ("model.",          False, "the inner model of an HF folder (e.g. LlamaModel, wrapped without its LM head)"),
)

# diffusers pipeline components whose layers a wrapper file names inside the component (no base given).
DIFFUSERS_COMPONENTS = tuple(prefix for prefix, from_sd, _ in ROOTS if from_sd)

# Heads an HF folder may not store (tied to the input embedding): named all the same, resolved by the plan.
TIED_HEADS = ("lm_head.weight",)


def is_wrapper_module(module: str) -> bool:
    return module.startswith(PREFIX + "_")


@dataclass(frozen=True)
class Root:
    prefix: str
    description: str
    by_name: dict[str, dict[str, Entry]]  # lycoris_<path> → {"weight": Entry, "bias": Entry}
    tied: frozenset[str] = frozenset()  # names of heads the base ties to its input embedding (not stored)


def _raw_entries(names: Iterable[str], indexed: set[str], conv1d: Callable[[str], bool]) -> list[Entry]:
    """Base tensors the SD index does not hold (LLM folders, lone components, a pipeline's other parts)."""
    out = []
    for name in names:
        if name in indexed or "." not in name:
            continue
        module, _, param = name.rpartition(".")
        out.append(Entry(name, None, conv1d(name), module, param, ()))
    return out


def _root(prefix: str, description: str, entries: list[Entry], tied: frozenset[str] = frozenset()) -> Root:
    by_name: dict[str, dict[str, Entry]] = {}
    for e in entries:
        if not e.module.startswith(prefix) or e.module == prefix.rstrip("."):  # rows: a fused tensor's slice
            continue
        by_name.setdefault(kohya_name(PREFIX, e.module[len(prefix):]), {}).setdefault(e.param, e)
    heads = frozenset(n for n, ps in by_name.items() if any(e.target in tied for e in ps.values()))
    return Root(prefix, description, by_name, heads)


def wrapper_roots(sd: SDNames, names: list[str], conv1d: Callable[[str], bool], tied: bool) -> list[Root]:
    """Every root (ROOTS order) with the wrapper names it gives the base's tensors."""
    indexed = {e.target for e in sd.entries}
    raw = _raw_entries(names, indexed, conv1d)
    heads = frozenset(h for h in TIED_HEADS if tied and h not in names)
    raw += [Entry(h, None, False, h.rpartition(".")[0], "weight", ()) for h in heads]
    return [_root(prefix, desc, sd.entries if from_sd else raw, heads) for prefix, from_sd, desc in ROOTS]


class WrapperNames:
    """The SD index of a base with the wrapper's `lycoris_` names of the one root that fits a file's modules."""

    def __init__(self, sd: SDNames, roots: list[Root], modules: Iterable[str]):
        wanted = [m for m in modules if is_wrapper_module(m)]
        self.family = sd.family
        self._sd = sd
        hits = [sum(m in r.by_name for m in wanted) for r in roots]
        best = roots[hits.index(max(hits))]
        tied = [r for r, h in zip(roots, hits) if h == max(hits) and r is not best and r.prefix and best.prefix]
        if max(hits) and tied:  # e.g. SDXL's two CLIP text encoders: the same module paths, different shapes
            raise BadInputError(f"its {PREFIX}_ names fit both {best.description} and {tied[0].description} of this "
                                "base; merge it into the component folder it was trained on alone (e.g. "
                                f"{tied[0].prefix.rstrip('.')}/)")
        self.root = best if max(hits) else None
        self.by_kohya = {k: v for k, v in sd.by_kohya.items() if not is_wrapper_module(k)}
        self.by_target: dict[tuple[str, tuple[int, int] | None], str] = {}
        if self.root is not None:
            self.by_kohya.update(self.root.by_name)
            for name, params in self.root.by_name.items():
                for e in params.values():
                    self.by_target.setdefault((e.target, e.rows), name)
        self.notes = [f"LyCORIS wrapper names matched under {best.prefix or '(no prefix)'}: {best.description}"] \
            if self.root is not None else []
        for m in sorted(set(wanted) & (self.root.tied if self.root else set())):
            self.notes.append(f"{m} updates the LM head, which this base ties to its input embedding: merged, the "
                              "embedding changes too (as LyCORIS's own merge_to does)")

    def entry_for_target(self, target: str, rows: tuple[int, int] | None) -> Entry | None:
        return self._sd.entry_for_target(target, rows)

    def wrapper_name(self, target: str, rows: tuple[int, int] | None) -> str | None:
        """The `lycoris_` module name of a base tensor under this root (None outside it)."""
        return self.by_target.get((target, rows))


def wrapper_index(base, modules: Iterable[str]) -> WrapperNames:
    """The name index a file with `modules` needs against `base` (a Checkpoint)."""
    names = base.names()
    sd = SDNames(names, lambda n: tuple(base.info(n).shape))
    roots = wrapper_roots(sd, names, lambda n: base.layer_hint(n) == "conv1d", base.tied())
    return WrapperNames(sd, roots, modules)


# What the module path after `lycoris_` says about the module that was wrapped (inspect without a base).
WRAPPED_LOOKS: tuple[tuple[str, str], ...] = (
    ("model_layers_",              "a whole HF LLM (*ForCausalLM): merge into its HF model folder"),
    ("layers_",                    "an HF LLM's inner model (e.g. LlamaModel): merge into its HF model folder"),
    ("transformer_blocks_",        "a DiT transformer (Flux, SD3, ...): merge into its diffusers folder"),
    ("single_transformer_blocks_", "a DiT transformer (Flux, SD3, ...): merge into its diffusers folder"),
    ("down_blocks_",               "a diffusers UNet (SD 1/2, SDXL): merge into its diffusers folder or single file"),
    ("up_blocks_",                 "a diffusers UNet (SD 1/2, SDXL): merge into its diffusers folder or single file"),
    ("text_model_",                "a CLIP text encoder: merge into its diffusers folder"),
)


def expected_bases(modules: Iterable[str] = ()) -> str:
    """What a wrapper file can be merged into, for `inspect` without a base: what its names look like, else
    every root."""
    seen = Counter(next((looks for start, looks in WRAPPED_LOOKS if m.startswith(f"{PREFIX}_{start}")), None)
                   for m in modules)
    seen.pop(None, None)
    if seen:
        return "its names look like " + seen.most_common(1)[0][0]
    return "; ".join(desc for _, _, desc in ROOTS)


def name_without_base(target: str) -> str | None:
    """The wrapper name of a diffusers/HF-style target when no base is given: a diffusers component's layers are
    named inside that component (the wrapper wrapped it), anything else inside the whole model."""
    module = target.rpartition(".")[0]
    if not module:
        return None
    for prefix in DIFFUSERS_COMPONENTS:
        if module.startswith(prefix):
            return kohya_name(PREFIX, module[len(prefix):])
    return kohya_name(PREFIX, module)
