"""Diffusion-transformer (DiT) name tables: one row per canonical tensor, a column per spelling, fused tensors as
row parts — and the one function that walks them (`DitIndex.pieces`).

Canonical names are diffusers module paths (inside the `transformer` component). The `original` column is the
model author's single-file spelling (BFL's `double_blocks.*` for Flux). A fused original tensor (Flux's
`img_attn.qkv`, `linear1` = q, k, v and the MLP input) is written `module[k]`: part k of that tensor's rows,
sized by `FUSED` ("h" = the tensor's input width, "*" = the rest). A part on the diffusers side works the same
way (Flux's `norm_out.linear` holds BFL's shift/scale halves swapped).

Dialects say which column a LoRA file spells and how (`DIALECTS`): kohya / sd-scripts flatten the original
module with "_" under `lora_unet_`; OneTrainer the diffusers one under `lora_transformer_`; diffusers,
ai-toolkit and SimpleTuner keep the dotted diffusers path under `transformer.`.

A new family is a `Family(...)` line with its rows and anchors (and its spec in formats/dit.md); no code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from loraport.names.dit_chroma import CHROMA_ANCHORS, CHROMA_FUSED, CHROMA_ROWS
from loraport.names.dit_flux import FLUX_FUSED, FLUX_INPUT, FLUX_PARAMS, FLUX_ROWS, FLUX_XLABS
from loraport.names.dit_flux2 import FLUX2_FUSED, FLUX2_ROWS
from loraport.names.dit_hidream import HIDREAM_ANCHOR, HIDREAM_ROWS
from loraport.names.dit_hunyuan import HUNYUAN_ANCHORS, HUNYUAN_FUSED, HUNYUAN_ROWS
from loraport.names.dit_ltx import LTX_ANCHORS, LTX_ROWS
from loraport.names.dit_ltx2 import LTX2_ANCHORS, LTX2_ROWS
from loraport.names.dit_lumina2 import LUMINA2_ANCHORS, LUMINA2_FUSED, LUMINA2_ROWS
from loraport.names.dit_qwen import QWEN_ANCHOR, QWEN_ROWS
from loraport.names.dit_sd3 import SD3_FUSED, SD3_ROWS
from loraport.names.dit_wan import WAN_ROWS
from loraport.names.dit_zimage import ZIMAGE_ANCHORS, ZIMAGE_FUSED, ZIMAGE_ROWS


# ------------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    name: str
    title: str
    rows: tuple[tuple[str, ...], ...]  # a cell per COLUMNS entry ("": the column has no such module)
    fused: dict[str, tuple[str, ...]]
    anchors: dict[str, str]  # base layout column → a tensor name only this family's base has in it
    text_encoders: dict[str, str]  # kohya prefix → diffusers pipeline component
    kin: str = ""  # a family whose modules of the same name are the same weights (Chroma: Flux, pruned)
    params: tuple[tuple[str, str], ...] = ()  # (diffusers, original) full tensors a control LoRA replaces
    input: tuple[str, ...] = ()  # (diffusers, original) input projection a control LoRA widens, config keys
    shadows: tuple[str, ...] = ()  # families whose anchors this family's bases also carry: its anchors go first


def _columns(rows: tuple[tuple[str, str], ...], *more: tuple[tuple[str, str], ...]) -> tuple[tuple[str, ...], ...]:
    """(diffusers, original) rows widened by further (diffusers, spelling) columns ("" where a column lacks one)."""
    extra = [dict(m) for m in more]
    return tuple((d, o, *(e.get(d, "") for e in extra)) for d, o in rows)


FAMILIES: tuple[Family, ...] = (
    Family("flux", "Flux.1 (dev, schnell, Kontext)", _columns(FLUX_ROWS, FLUX_XLABS), FLUX_FUSED,
           # a modulation tensor: Chroma (Flux with the modulation pruned) has the rest of Flux's names, and
           # Flux.2's file has single_blocks.0.linear1 too (its modulation is shared, not per block)
           {"diffusers": "single_transformer_blocks.0.norm.linear.weight",
            "original": "single_blocks.0.modulation.lin.weight"},
           {"lora_te1": "text_encoder", "lora_te3": "text_encoder_2"}, params=FLUX_PARAMS, input=FLUX_INPUT),
    Family("sd3", "SD3 / SD3.5", _columns(SD3_ROWS), SD3_FUSED,
           {"diffusers": "pos_embed.proj.weight", "original": "joint_blocks.0.x_block.attn.qkv.weight"},
           {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}),
    Family("wan", "Wan 2.1 / 2.2", _columns(WAN_ROWS), {},
           {"diffusers": "condition_embedder.time_proj.weight", "original": "time_projection.1.weight"}, {}),
    Family("qwen", "Qwen-Image (and Edit)", _columns(QWEN_ROWS), {},
           {"diffusers": QWEN_ANCHOR, "original": QWEN_ANCHOR}, {}),
    Family("chroma", "Chroma", _columns(CHROMA_ROWS, FLUX_XLABS), CHROMA_FUSED,  # XLabs: Flux attention LoRAs
           CHROMA_ANCHORS, {"lora_te3": "text_encoder"}, kin="flux"),  # sd-scripts: T5 keeps Flux's te3
    Family("lumina2", "Lumina-Image 2.0", _columns(LUMINA2_ROWS), LUMINA2_FUSED, LUMINA2_ANCHORS,
           {"lora_te": "text_encoder"}),  # sd-scripts lora_lumina: Gemma2
    Family("hidream", "HiDream-I1 / E1", _columns(HIDREAM_ROWS), {},
           {"diffusers": HIDREAM_ANCHOR, "original": HIDREAM_ANCHOR}, {}),
    Family("flux2", "Flux.2 (dev, Klein)", _columns(FLUX2_ROWS), FLUX2_FUSED,
           {"diffusers": "single_stream_modulation.linear.weight", "original": "single_stream_modulation.lin.weight"},
           {}),
    Family("hunyuan_video", "HunyuanVideo", _columns(HUNYUAN_ROWS), HUNYUAN_FUSED, HUNYUAN_ANCHORS,
           {}, shadows=("flux",)),
    Family("ltx_video", "LTX-Video", _columns(LTX_ROWS), {}, LTX_ANCHORS, {}),
    Family("ltx2", "LTX-2", _columns(LTX2_ROWS), {}, LTX2_ANCHORS, {}, shadows=("ltx_video",)),
    Family("zimage", "Z-Image (Turbo, Omni)", _columns(ZIMAGE_ROWS), ZIMAGE_FUSED, ZIMAGE_ANCHORS, {}),
)

# Bases of families without a table yet, named in the "wrong base" message (column → anchor).
OTHER_BASES: tuple[tuple[str, str], ...] = (
    ("SD 1.x / 2.x / SDXL (UNet)", "down_blocks.0.resnets.0.conv1.weight"),
    ("SD 1.x / 2.x / SDXL (UNet)", "input_blocks.0.0.weight"),
)

# dialect → (column, module-name prefix, separator). The first dialect of a column is the one written.
DIALECTS: dict[str, tuple[str, str, str]] = {
    "kohya":      ("original",  "lora_unet_",        "_"),
    "onetrainer": ("diffusers", "lora_transformer_", "_"),
    "diffusers":  ("diffusers", "transformer.",      "."),
    "xlabs":      ("xlabs",     "",                  "."),  # XLabs-AI x-flux (`….processor.qkv_lora1`)
    "comfy":      ("original",  "diffusion_model.",  "."),  # diffusion-pipe, ComfyUI (PEFT keys, original names)
    "diffsynth":  ("original",  "",                  "."),  # DiffSynth-Studio (`….lora_A.default.weight`)
    "peft_original": ("original", "base_model.model.", "."),  # PEFT around the original model (fal Kontext)
    "lycoris":    ("diffusers", "lycoris_",          "_"),  # LyCORIS wrapper around the diffusers model (SimpleTuner)
    "lycoris_original": ("original", "lycoris_",     "_"),  # LyCORIS wrapper around the original model (ComfyUI Wan)
    "musubi":     ("diffusers", "lora_unet_",        "_"),  # musubi-tuner's Z-Image: its model has diffusers' names
    "aitoolkit":  ("diffusers", "diffusion_model.",  "."),  # ai-toolkit's Z-Image: ComfyUI's prefix, diffusers' names
}
# dialects that only some families' trainers write (absent: every family's); others' names are not read so
ONLY_FOR: dict[str, tuple[str, ...]] = {"musubi": ("zimage",), "aitoolkit": ("zimage",)}
DIALECT_TITLES = {"kohya": "kohya / sd-scripts (original names)", "onetrainer": "OneTrainer (lora_transformer_)",
                  "diffusers": "diffusers / ai-toolkit / SimpleTuner (transformer.)",
                  "xlabs": "XLabs x-flux (processor.qkv_lora1)",
                  "comfy": "diffusion-pipe / ComfyUI (diffusion_model.)",
                  "diffsynth": "DiffSynth-Studio (bare original names)",
                  "peft_original": "PEFT on original names (base_model.model.; fal Kontext)",
                  "lycoris": "LyCORIS wrapper / SimpleTuner (lycoris_, diffusers names)",
                  "lycoris_original": "LyCORIS wrapper (lycoris_, original names)",
                  "musubi": "musubi-tuner (lora_unet_, diffusers names)",
                  "aitoolkit": "ai-toolkit (diffusion_model., diffusers names)"}
READ_BY = {"kohya": "kohya", "onetrainer": "kohya", "diffusers": "diffusers", "xlabs": "xlabs", "comfy": "diffusers",
           "diffsynth": "diffusers", "peft_original": "diffusers", "lycoris": "lycoris",
           "lycoris_original": "lycoris", "musubi": "kohya", "aitoolkit": "diffusers"}  # dialect → format
WRITTEN_BY = {"kohya": "kohya", "diffusers": "diffusers"}  # dialect → the `convert --to` format that writes it
BASE_PREFIXES = {"diffusers": ("transformer.", ""), "original": ("model.diffusion_model.", "")}
BASE_TITLES = {"diffusers": "diffusers folder (transformer/)", "original": "original single file"}
COLUMNS = ("diffusers", "original", "xlabs")  # the spellings a table row has; the first two are base layouts


# ================================================================================================= code
_PART = re.compile(r"^(?P<m>.+?)(?:\[(?P<k>\d+)\])?$")


def _split(cell: str) -> tuple[str, int | None]:
    m = _PART.match(cell)
    return m.group("m"), None if m.group("k") is None else int(m.group("k"))


@lru_cache(maxsize=4096)
def _regex(template: str, sep: str = ".") -> re.Pattern:
    rx = re.escape(template.replace(".", sep)) if sep != "." else re.escape(template)
    for v in ("i", "s", "e"):  # block, single block, expert
        rx = rx.replace(re.escape("{" + v + "}"), rf"(?P<{v}>\d+)")
    return re.compile("^" + rx + "$")


@dataclass(frozen=True)
class Piece:
    """Where (part of) a LoRA module lands: the target module, its rows there, and the LoRA's own rows."""

    module: str  # module name in the target column (no prefix, no ".weight")
    rows: tuple[int, int] | None  # rows of the target tensor (None: all)
    lora_rows: tuple[int, int] | None  # rows of the LoRA's B that go there (None: all)


def part_rows(spec: tuple[str, ...], k: int, h: int, total: int | None, own: int | None = None
              ) -> tuple[int, int] | None:
    """Row range of part k of a fused tensor (`spec` from FUSED; h its input width, total its rows when known,
    own the part's rows when known), None when it cannot be sized. Several "*" parts share the rest equally
    (Lumina2's grouped-query k and v)."""
    if k >= len(spec):
        return None
    sizes: list[int | None] = [h if s == "h" else None for s in spec]
    stars, rest = spec.count("*"), None
    if stars and total is not None and (total - spec.count("h") * h) % stars == 0:
        rest = (total - spec.count("h") * h) // stars
    elif spec[k] == "*":
        rest = own
    sizes = [rest if s is None else s for s in sizes]
    if any(s is None for s in sizes[:k + 1]):
        return None
    start = sum(sizes[:k])  # type: ignore[arg-type]
    return start, start + sizes[k]  # type: ignore[operator]


class Table:
    """A family's rows, instantiated lazily: concrete module name in one column → its rows in the other."""

    def __init__(self, family: Family):
        self.family = family
        self.rows = [tuple(_split(c) if c else None for c in (*row, *[""] * (len(COLUMNS) - len(row))))
                     for row in family.rows]
        self._rx = {col: [(_regex(cell[0]), cell[1], idx) for idx, cell in enumerate(r[c] for r in self.rows) if cell]
                    for c, col in enumerate(COLUMNS)}
        self._fused = {(_regex(k), v) for k, v in family.fused.items()}

    def match(self, module: str, column: str) -> list[tuple[int | None, dict, int]]:
        """[(part in `module`, placeholders, row index)] of the rows whose `column` cell is `module`."""
        out = []
        for rx, part, idx in self._rx[column]:
            m = rx.match(module)
            if m:
                out.append((part, m.groupdict(), idx))
        return out

    def other(self, idx: int, column: str, values: dict) -> tuple[str, int | None] | None:
        cell = self.rows[idx][COLUMNS.index(column)]
        return None if cell is None else (cell[0].format(**values), cell[1])

    def spec(self, module: str) -> tuple[str, ...] | None:
        for rx, spec in self._fused:
            if rx.match(module):
                return spec
        return None

    def knows(self, module: str) -> bool:
        return any(self.match(module, c) for c in COLUMNS)

    def _by_shape(self, module: str, hits: list, h: int, total: int | None) -> list:
        """A module that is a whole row and also parts (SD3's last context modulation): the parts when the
        tensor has exactly their rows, else the whole."""
        whole, parts = [x for x in hits if x[0] is None], [x for x in hits if x[0] is not None]
        if not whole or not parts:
            return hits
        spec = self.spec(module) or ()
        return parts if total is not None and "*" not in spec and total == len(spec) * h else whole

    def translate(self, module: str, column: str, to: str, h: int, total: int | None,
                  to_shape: Callable[[str], tuple[int, ...] | None] = lambda m: None) -> list[Piece] | None:
        """Where the LoRA on `module` (spelled in `column`, output `total` rows, input width h) lands in `to`;
        None when the table does not know `module`, [] when a part cannot be sized."""
        hits = self._by_shape(module, self.match(module, column), h, total)
        if not hits:
            return None
        if column == to:
            return [Piece(module, None, None)]
        own = self.spec(module)
        pieces = []
        for part, values, idx in hits:
            lrows = None if part is None else part_rows(own or (), part, h, total)
            if (cell := self.other(idx, to, values)) is None:
                return []
            tmod, tpart = cell
            trows = None
            if tpart is not None:
                shape = to_shape(tmod)
                own_rows = total if part is None else None
                trows = part_rows(self.spec(tmod) or (), tpart, shape[1] if shape else h,
                                  shape[0] if shape else None, own_rows)
            if (part is not None and lrows is None) or (tpart is not None and trows is None):
                return []
            pieces.append(Piece(tmod, trows, lrows))
        ends = [p.lora_rows[1] for p in pieces if p.lora_rows]
        if ends and total is not None and max(ends) != total:
            raise ValueError(f"{module} has {total} output rows; its parts ({', '.join(own or ())} with h = {h}) "
                             f"make {max(ends)}")
        return pieces


TABLES = {f.name: Table(f) for f in FAMILIES}


def spell(dialect: str, module: str) -> str:
    _, prefix, sep = DIALECTS[dialect]
    return prefix + module.replace(".", sep) if sep != "." else prefix + module


def unspell(name: str) -> list[tuple[str, str, str]]:
    """A LoRA module name → [(family, dialect, module in the dialect's column)] the tables know. kohya names are
    matched against the table's templates with "_" for "." (module names contain "_": never split back)."""
    out = []
    for dialect, (column, prefix, sep) in DIALECTS.items():
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        for fam, table in TABLES.items():
            if fam not in ONLY_FOR.get(dialect, (fam,)):
                continue
            for row in table.rows:
                cell = row[COLUMNS.index(column)]
                if cell is None:
                    continue
                m = _regex(cell[0], sep).match(rest)
                if m:
                    out.append((fam, dialect, cell[0].format(**m.groupdict())))
                    break
    return out


def families_of_modules(names: Iterable[str | tuple[str, ...]]) -> dict[str, tuple[int, set[str]]]:
    """family → (how many of a LoRA's modules its table knows, their dialects); a tuple of spellings: one module."""
    fams: dict[str, list[frozenset[str]]] = {}  # family → per module it knows, the dialects that read it
    for n in names:
        hits = [h for alt in ((n,) if isinstance(n, str) else n) for h in unspell(alt)]
        for fam in dict.fromkeys(f for f, _, _ in hits):
            fams.setdefault(fam, []).append(frozenset(d for f, d, _ in hits if f == fam))
    return {fam: (len(per), _spoken(per)) for fam, per in fams.items()}


def _spoken(per: list[frozenset[str]]) -> set[str]:
    """The dialects a LoRA is written in, from the dialects reading each module: one that reads only modules another
    reads too, which also reads more, is not (Z-Image's `feed_forward.w1` is `lora_unet_` in kohya's and musubi's
    spelling alike: a file with `attention_to_q` is musubi's)."""
    every = set().union(*per)

    def reads(d: str) -> frozenset[int]:
        return frozenset(i for i, p in enumerate(per) if d in p)

    spoken = {d for d in every if not any(reads(d) < reads(e) for e in every)}
    # two dialects spelling every module alike (a `lycoris_` name the same in both columns: Qwen-Image's, Wan's
    # patch_embedding): the first of them
    order = list(DIALECTS)
    return {d for d in spoken if not any(order.index(e) < order.index(d) and reads(e) == reads(d)
                                         and DIALECTS[e][1:] == DIALECTS[d][1:] for e in spoken)}


def family_of_modules(names: Iterable[str], prefer: str | None = None) -> tuple[str | None, set[str]]:
    """(family, dialects) of a LoRA's module names: the family whose table knows most of them (`prefer`, the
    base's family, among equals: Flux and SD3 share `transformer_blocks.N.attn.to_q`); None when none does."""
    fam, dialects, _ = family_and_alike(names, prefer)
    return fam, dialects


def family_and_alike(names: Iterable[str], prefer: str | None = None) -> tuple[str | None, set[str], list[str]]:
    """family_of_modules and the other families whose tables know as many of the modules (a diffusers LoRA on
    Flux's double / single blocks is HunyuanVideo's names too): the first of them in FAMILIES' order wins."""
    fams = families_of_modules(names)
    if not fams:
        return None, set(), []
    best = max(c for c, _ in fams.values())
    top = [f for f, (c, _) in fams.items() if c == best]
    fam = prefer if prefer in top else top[0]
    return fam, fams[fam][1], [f for f in top if f != fam]


@dataclass(frozen=True)
class BaseLayout:
    family: str | None  # a family with a table, or None
    column: str | None  # "diffusers" | "original"
    prefix: str
    title: str  # the family's title, or what the base is when it is another model


def base_layout(names: Iterable[str]) -> BaseLayout:
    """Which family and layout a base's tensor names are (by anchor names), and the prefix its names carry."""
    names = list(names)
    for fam in sorted(FAMILIES, key=lambda f: not f.shadows):  # a family that shadows another is tried first
        for column, anchor in fam.anchors.items():
            for n in names:
                if n.endswith(anchor) and (n == anchor or n[:-len(anchor)].endswith(".")):
                    return BaseLayout(fam.name, column, n[:-len(anchor)], fam.title)
    for title, anchor in OTHER_BASES:
        if any(n.endswith(anchor) for n in names):
            return BaseLayout(None, None, "", title)
    return BaseLayout(None, None, "", "not a diffusion-transformer base")


def param_name(family: str, name: str, to: str) -> str | None:
    """A full tensor's name (a `params` row's, spelled in either column, no prefix) in column `to`; None when
    the family's table has no such tensor."""
    for row in TABLES[family].family.params:
        for cell in row:
            m = _regex(cell).match(name)
            if m:
                return row[COLUMNS.index(to)].format(**m.groupdict())
    return None


def family_title(name: str) -> str:
    return next(f.title for f in FAMILIES if f.name == name)


def kin(a: str, b: str) -> bool:
    """Whether two families' shared module names are the same weights (a LoRA of one fits the other there)."""
    fams = {f.name: f for f in FAMILIES}
    return fams[a].kin == b or fams[b].kin == a


def support_table() -> str:
    """The README's family × dialect × base-layout table (a test keeps the README equal to it)."""
    head = ["family", "dialect", "read (format)", "written by", *[f"merge into {t}" for t in BASE_TITLES.values()]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fam in FAMILIES:
        for d, (column, _, _) in DIALECTS.items():
            if not any(row[COLUMNS.index(column)] for row in TABLES[fam.name].rows) \
                    or fam.name not in ONLY_FOR.get(d, (fam.name,)):
                continue  # a trainer that never targets this family
            fmt = READ_BY[d]
            wrote = f"`convert --to {WRITTEN_BY[d]}`" if d in WRITTEN_BY else "—"
            into = " | ".join("yes" if c in fam.anchors else "—" for c in BASE_TITLES)
            lines.append(f"| {fam.title} | {DIALECT_TITLES[d]} | `{fmt}` | {wrote} | {into} |")
    return "\n".join(lines)
