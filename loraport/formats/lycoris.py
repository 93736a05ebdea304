"""LyCORIS single files (`lycoris.kohya` networks or the standalone `lycoris_` wrapper): LoCon, LoHa, LoKr
(full or factored w1/w2, Tucker), IA³, full/diff, with `dora_scale` on either axis. Spec: formats/lycoris.md.

The layout is kohya's (one safetensors file, `<module>.<tensor>`), so the parser and writer live in
formats/kohya.py; this module is the LyCORIS face of it (detection and the format name)."""

from __future__ import annotations

from pathlib import Path

from loraport.adapter import Adapter
from loraport.formats import AdapterFormat, ReadOptions, register
from loraport.formats.kohya import (LYCORIS_ONLY, KohyaWriteOptions, header_keys, read_single_file, split_key,
                                    write_single_file)


@register(write=KohyaWriteOptions)
class LycorisFormat(AdapterFormat):
    name = "lycoris"
    title = "LyCORIS (LoCon, LoHa, LoKr, IA³, full/diff, DoRA)"
    spec = "lycoris"
    output_is_dir = False
    output_suffix = ".safetensors"

    @classmethod
    def detect(cls, path: Path) -> int:
        keys = header_keys(path)
        parsed = [sp for k in keys if (sp := split_key(k))]
        if any(s in LYCORIS_ONLY for _, s in parsed) or any(m.startswith("lycoris_") for m, _ in parsed):
            return 85 if len(parsed) == len(keys) else 60
        return 0

    @classmethod
    def read_with(cls, path: Path, base, opts: ReadOptions) -> Adapter:
        return read_single_file(path, cls.name, base=base, strict=opts.strict)

    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base, opts: KohyaWriteOptions) -> list[Path]:
        return write_single_file(adapter, path, base=base, bake=opts.bake, unet_names=opts.unet_names)
