"""XLabs-AI x-flux LoRA for Flux.1: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`,
`single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight` (optionally under `diffusion_model.`), no alpha
(scale 1, as x-flux's LoRA processors and diffusers' converter use it). Names are a column of the Flux table in
loraport/names/dit.py. Spec: formats/xlabs.md (the Flux table: formats/dit.md)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from loraport.adapter import Adapter, Delta, LoraDelta
from loraport.errors import BadInputError
from loraport.formats import AdapterFormat, ReadOptions, register
from loraport.formats._common import check_unmatched
from loraport.formats._dit import DitNames
from loraport.formats.kohya import header_keys
from loraport.tensorfile import load_tensors

KEY = re.compile(r"^(?:diffusion_model\.)?(?P<m>(?:double|single)_blocks\.\d+\.processor\.[a-z]+_lora\d?)"
                 r"\.(?P<r>down|up)\.weight$")


@register
class XLabsFormat(AdapterFormat):
    name = "xlabs"
    title = "XLabs x-flux LoRA (Flux.1)"
    writable = False

    @classmethod
    def detect(cls, path: Path) -> int:
        keys = header_keys(path)
        hits = sum(bool(KEY.match(k)) for k in keys)
        return 0 if not hits else 90 if hits == len(keys) else 50

    @classmethod
    def read_with(cls, path: Path, base, opts: ReadOptions) -> Adapter:
        tensors, meta = load_tensors(path)
        groups: dict[str, dict] = defaultdict(dict)
        unrecognised = []
        for key, t in tensors.items():
            m = KEY.match(key)
            if m is None:
                unrecognised.append(key)
            else:
                groups[m.group("m")][m.group("r")] = t
        dit = DitNames.detect(list(groups), base, path, strict=opts.strict, family="flux")  # x-flux: Flux.1 only
        if dit is None:
            raise BadInputError(f"{path}: no XLabs Flux LoRA keys (double_blocks.N.processor.qkv_lora1.down.weight)")
        deltas: list[Delta] = []
        unmatched: list[str] = []
        for mod, p in groups.items():
            placed = dit.place(mod, [_delta(path, mod, p)], path)
            if placed is None:
                unmatched.append(mod)
            deltas += placed or []
        notes = {dit.note(), "no alpha in XLabs files: scale 1"}
        check_unmatched(path, len(groups) - len(unmatched), unrecognised, unmatched, opts.strict, notes)
        if not deltas:
            raise BadInputError(f"{path}: none of its modules is in the base")
        metadata = dict(meta)
        if unrecognised or unmatched:
            metadata["skipped"] = unrecognised + unmatched
        return Adapter(deltas, cls.name, str(path), metadata=metadata, notes=sorted(notes), files=[str(path)],
                       name=Path(path).stem, family=dit.summary())


def _delta(path: Path, mod: str, p: dict) -> LoraDelta:
    down, up = p.get("down"), p.get("up")
    if down is None or up is None:
        raise BadInputError(f"{path}: {mod} has only one of down/up")
    if not (down.is_floating_point() and up.is_floating_point()) or down.dim() != 2 or up.dim() != 2 \
            or up.shape[1] != down.shape[0] or down.numel() == 0:
        raise BadInputError(f"{path}: {mod}: down {list(down.shape)} and up {list(up.shape)} do not fit")
    return LoraDelta(f"{mod}.weight", A=down, B=up, scale=1.0, alpha=None, source_key=mod)
