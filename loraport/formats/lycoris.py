"""LyCORIS single files, in both dialects: `lycoris.kohya` networks (kohya's `lora_unet_…`/`lora_te…_…` names)
and the whole-model wrapper `lycoris.create_lycoris(module)` (SimpleTuner; `lycoris_<module path>`). LoCon,
LoHa, LoKr (full or factored w1/w2, Tucker), IA³, full/diff, with `dora_scale` on either axis.
Spec: formats/lycoris.md.

The layout is kohya's (one safetensors file, `<module>.<tensor>`), so the parser and writer live in
formats/kohya.py and the wrapper's names in loraport/names/lycoris_wrapper.py; this module is the LyCORIS face of
them (detection, the format name, the dialect a file is written in)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from loraport.adapter import Adapter, Delta
from loraport.errors import BadInputError
from loraport.formats import AdapterFormat, ReadOptions, choice, register
from loraport.formats._dit import DitReadOptions
from loraport.formats.kohya import (KNOWN_PREFIXES, LYCORIS_ONLY, KohyaWriteOptions, header_keys,
                                    read_single_file, split_key, write_single_file)
from loraport.names.lycoris_wrapper import (DIFFUSERS_COMPONENTS, PREFIX, expected_bases, is_wrapper_module,
                                            name_without_base, wrapper_roots)
from loraport.names.sd import SDNames

WRAPPER = "lycoris wrapper"  # the dialect's name in inspect and in Adapter.config["dialect"]


@dataclass(frozen=True)
class LycorisWriteOptions(KohyaWriteOptions):
    """names: "kohya" (`lora_unet_…`, `lora_te…_…`, as lycoris.kohya writes) or "wrapper" (`lycoris_<module
    path>`, as lycoris.create_lycoris writes). Default: the dialect the adapter was read in, else kohya where
    the base (or the targets) have kohya names, else the wrapper."""

    names: str | None = choice(None, "kohya", "wrapper")


@register(read=DitReadOptions, write=LycorisWriteOptions)
class LycorisFormat(AdapterFormat):
    name = "lycoris"
    title = "LyCORIS (LoCon, LoHa, LoKr, IA³, full/diff, DoRA)"
    spec = "lycoris"
    output_is_dir = False
    output_suffix = ".safetensors"
    own_naming = (PREFIX + "_",)  # wrapper names read without a base only make sense against one

    @classmethod
    def detect(cls, path: Path) -> int:
        keys = header_keys(path)
        parsed = [sp for k in keys if (sp := split_key(k))]
        if any(s in LYCORIS_ONLY for _, s in parsed) or any(is_wrapper_module(m) for m, _ in parsed):
            return 85 if len(parsed) == len(keys) else 60
        return 0

    @classmethod
    def read_with(cls, path: Path, base, opts: ReadOptions) -> Adapter:
        ad = read_single_file(path, cls.name, base=base, strict=opts.strict, transformer=opts.transformer,
                              family=opts.family)
        if not any(is_wrapper_module(d.source_key) for d in ad.deltas):
            return ad
        notes = {"dialect: LyCORIS whole-model wrapper (lycoris_<module path>; lycoris.create_lycoris, SimpleTuner)"}
        if base is None:
            looks = expected_bases(d.source_key for d in ad.deltas)
            notes.add(f"expects a base holding the module it wrapped; {looks}")
        config = {**ad.config, "dialect": WRAPPER}
        if "lycoris_config" in ad.metadata:  # SimpleTuner stores its LyCORIS config (JSON) in the metadata
            config["lycoris_config"] = ad.metadata["lycoris_config"]
        return replace(ad, config=config, notes=sorted(set(ad.notes) | notes))

    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base, opts: LycorisWriteOptions) -> list[Path]:
        namer = None
        if _wants_wrapper(adapter, base, opts.names):
            if opts.unet_names is not None:
                raise BadInputError("unet_names applies to kohya names; the LyCORIS wrapper names modules by their "
                                    "diffusers path")
            namer = _wrapper_namer(adapter, base)
        return write_single_file(adapter, path, base=base, bake=opts.bake, unet_names=opts.unet_names,
                                 module_name=namer)


def _wants_wrapper(adapter: Adapter, base, names: str | None) -> bool:
    if names is not None:
        return names == "wrapper"
    if adapter.config.get("dialect") == WRAPPER:
        return True
    if base is not None:
        sd = SDNames(base.names(), lambda n: tuple(base.info(n).shape))
        return not all((e := sd.entry_for_target(d.target, d.rows)) and e.kohya for d in adapter.deltas)
    kohya_like = DIFFUSERS_COMPONENTS + KNOWN_PREFIXES
    return not all(d.target.startswith(kohya_like) and not is_wrapper_module(d.target) for d in adapter.deltas)


def _wrapper_namer(adapter: Adapter, base):
    """delta → `lycoris_<path>` under the one root (wrapped module) that holds every target; refused otherwise."""
    for d in adapter.deltas:
        if d.rows is not None:
            raise BadInputError(f"{d.target}: a row slice of a fused tensor has no LyCORIS wrapper name (LyCORIS "
                                "wraps whole layers); write names=kohya")
    if base is None:
        return _namer_without_base(adapter)
    sd = SDNames(base.names(), lambda n: tuple(base.info(n).shape))
    roots = wrapper_roots(sd, base.names(), lambda n: base.layer_hint(n) == "conv1d", base.tied())
    by_target = [{(e.target, e.rows): name for name, ps in r.by_name.items() for e in ps.values()} for r in roots]
    best = max(range(len(roots)), key=lambda i: sum((d.target, d.rows) in by_target[i] for d in adapter.deltas))
    missing = [d.target for d in adapter.deltas if (d.target, d.rows) not in by_target[best]]
    if missing:
        raise BadInputError(f"{missing[0]}: outside {roots[best].description}, the one module a LyCORIS wrapper "
                            f"file names ({len(missing)} target(s) outside it); write names=kohya, or convert "
                            "that component's part alone")
    return lambda d: by_target[best][(d.target, d.rows)]


def _namer_without_base(adapter: Adapter):
    comps = {d.target.split(".", 1)[0] for d in adapter.deltas if d.target.startswith(DIFFUSERS_COMPONENTS)}
    if len(comps) > 1 or (comps and not all(d.target.startswith(DIFFUSERS_COMPONENTS) for d in adapter.deltas)):
        raise BadInputError(f"{adapter.path}: updates several parts of a pipeline ({', '.join(sorted(comps))}); a "
                            "LyCORIS wrapper file names the layers of one wrapped module; write names=kohya, or "
                            "pass --base")

    def name(d: Delta) -> str:
        mod = d.target.rpartition(".")[0]
        if is_wrapper_module(mod) and "." not in mod:
            return mod  # read without a base: already a wrapper name
        n = name_without_base(d.target)
        if n is None:
            raise BadInputError(f"{d.target}: no module path to name it by")
        return n
    return name
