"""Diffusion-transformer LoRAs in the readers and writers of the kohya and diffusers formats: a LoRA module named
in any dialect of a family (loraport/names/dit.py) placed on the base's tensors, split where the base keeps apart
what the LoRA's module fuses (a rank-r LoRA on qkv → three rank-r LoRAs sharing A), and, for writing, regrouped
into the dialect's modules (three LoRAs on q, k, v → one LoRA on qkv: rank r when they share A, else rank 3r).
Every step is exact or refused. Spec: formats/dit.md."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


from loraport.adapter import Delta
from loraport.errors import BadInputError
from loraport.formats import ReadOptions, choice
from loraport.names import dit
from loraport.names.sd import kohya_name, te_spellings

SUFFIXES = (".weight", ".bias")


def _strip(target: str) -> tuple[str, str]:
    for s in SUFFIXES:
        if target.endswith(s):
            return target[: -len(s)], s
    return target, ""


@dataclass(frozen=True)
class DitReadOptions(ReadOptions):
    """The readers of DiT LoRAs (kohya, diffusers, LyCORIS). `transformer`: which transformer of a diffusers
    folder the LoRA goes into: Wan 2.2 A14B pipelines carry a second (low-noise) expert in `transformer_2/`
    ("transformer_2", or "both"). `family`: the family a LoRA is read as when its module names fit several (a
    diffusers LoRA on Flux.1's blocks has HunyuanVideo's and Flux.2's names too) and no base tells which."""

    transformer: str = choice("transformer", "transformer_2", "both")
    family: str = choice("", *(f.name for f in dit.FAMILIES))


EXPERTS = {"transformer": "transformer.", "transformer_2": "transformer_2."}  # Wan 2.2 A14B: high / low noise


def _experts(base, prefix: str, transformer: str, where) -> tuple[str, ...]:
    """The name prefixes a LoRA's deltas go to: the layout's own, or the chosen transformer(s) of the folder."""
    if transformer == "transformer":
        return (prefix,)
    if prefix != EXPERTS["transformer"] or not any(n.startswith(EXPERTS["transformer_2"]) for n in base.names()):
        raise BadInputError(f"{where}: transformer={transformer!r}, but the base has no transformer_2/ (a Wan 2.2 "
                            "A14B pipeline folder has); merge into its transformer (the default)")
    wanted = EXPERTS if transformer == "both" else {transformer: EXPERTS[transformer]}
    return tuple(wanted.values())


def _not_in(modules, fam: str, lay: dit.BaseLayout) -> str:
    """Why a LoRA of a kin family does not fit the base (Flux on Chroma): the modules the base's family lacks,
    counted, the first named; "" when the families are not kin (the same name in Qwen-Image and Flux is another
    weight) or share none of its modules."""
    if lay.family is None or not dit.kin(fam, lay.family):
        return ""
    names = [(m,) if isinstance(m, str) else tuple(m) for m in modules]
    missing = [n[0] for n in names if not any(f == lay.family for alt in n for f, _, _ in dit.unspell(alt))]
    if not missing or len(missing) == len(names):
        return ""
    return f": {len(missing)} of its {len(names)} modules (e.g. {missing[0]}) are not in a {lay.title} model"


@dataclass
class DitNames:
    """A DiT LoRA's family against a base (or none): where each of its modules lands."""

    family: str
    dialects: set[str]
    base: object | None  # loraport.checkpoint.Checkpoint
    layout: dit.BaseLayout | None
    column: str = "diffusers"  # the column of the targets: the base's, or canonical (diffusers) without a base
    prefix: str = "transformer."
    prefixes: tuple[str, ...] = ("transformer.",)  # where placed deltas go: prefix, or each expert's (Wan 2.2)
    _te: dict[str, str] | None = field(default=None, repr=False)
    padded: list[str] = field(default_factory=list, repr=False)  # LoRAs fitted to a control model's wider input
    alike: tuple[str, ...] = ()  # other families whose tables know the LoRA's modules as well as `family`'s
    stated: bool = False  # the family is the user's choice among those (read option `family`)

    @classmethod
    def detect(cls, modules, base, where, transformer: str = "transformer", strict: bool = True, family: str = ""
               ) -> DitNames | None:
        """None unless the modules are a DiT family's; refuses a base of another family in one line.
        `transformer`: the diffusers folder's transformer the LoRA goes into ("transformer_2", "both": Wan 2.2's
        second expert too). `strict=False`: a LoRA of a family sharing modules with the base's (Flux on Chroma)
        is read as the base's family; the modules it lacks are then unmatched, skipped and noted by the reader.
        `family`: the user's word for which family fits best when the names fit several and there is no base."""
        lay = dit.base_layout(base.names()) if base is not None else None
        fam, dialects, alike = dit.family_and_alike(modules, lay.family if lay else (family or None))
        if fam is None:
            return None
        if lay is None:
            stated = bool(family) and fam == family
            return cls(fam, dialects, None, None, alike=() if stated else tuple(alike), stated=stated)
        if lay.family != fam:
            why = _not_in(modules, fam, lay)
            if not why or strict:
                title = " or ".join(dit.family_title(f) for f in (fam, *alike))  # names several fit alike
                err = BadInputError(f"{where}: a {title} LoRA, but the base is {lay.title}{why}; pass a {title} base")
                raise err.hint("--no-strict", f"merges the modules a {lay.title} model has and skips the rest") \
                    if why else err
            fam, dialects = lay.family, dit.families_of_modules(modules)[lay.family][1]
        prefix = lay.prefix
        if lay.column == "diffusers" and prefix in EXPERTS.values():
            prefix = "transformer."  # a two-expert folder: the first expert is the default
        prefixes = _experts(base, prefix, transformer, where)
        return cls(fam, dialects, base, lay, lay.column, prefixes[0], prefixes, alike=tuple(alike))

    # --- reading --------------------------------------------------------------------------------
    def _shape(self, module: str) -> tuple[int, ...] | None:
        name = self.prefix + module + ".weight"
        if self.base is None or name not in self.base:
            return None
        return tuple(self.base.info(name).shape)

    def pieces(self, name: str, h: int, total: int, where="") -> list[dit.Piece] | None:
        """Where the module `name` (as the LoRA spells it) lands; None when the family's table lacks it."""
        for fam, dialect, module in dit.unspell(name):
            if fam == self.family:
                table = dit.TABLES[fam]
                try:
                    return table.translate(module, dit.DIALECTS[dialect][0], self.column, h, total, self._shape)
                except ValueError as e:
                    raise BadInputError(f"{where}: {name}: {e}; not a {dit.family_title(fam)} LoRA of this "
                                        "shape") from None
        return None

    def _text_encoder(self, name: str) -> str | None:
        """The base tensor (without suffix) of a text-encoder module: kohya `lora_te1_…` / diffusers
        `text_encoder.…`, found forward from the base's names (a diffusers folder); None if absent."""
        if self._te is None:
            self._te = {}
            comps = dit.TABLES[self.family].family.text_encoders
            for n in self.base.names() if self.base is not None else ():
                comp, _, rest = n.partition(".")
                mod, suffix = _strip(rest)
                if suffix != ".weight":
                    continue
                for pre, c in comps.items():
                    if c == comp:
                        for m in te_spellings(mod):
                            self._te.setdefault(kohya_name(pre, m), f"{comp}.{mod}")
                            self._te.setdefault(f"{comp}.{m}", f"{comp}.{mod}")
        return self._te.get(name)

    def place(self, name: str, deltas: list[Delta], where) -> list[Delta] | None:
        """The deltas read for module `name` (targets `name.weight` / `name.bias`) on the base's tensors;
        None when the base has no such module."""
        if not deltas:
            return []
        d0 = next((d for d in deltas if d.has_lora_factors), None)
        shape = d0.implied_shape() if d0 is not None else deltas[0].implied_shape()
        h, total = (int(shape[1]), int(shape[0])) if shape and len(shape) == 2 else (0, 0)
        pieces = self.pieces(name, h, total, where)
        if pieces is None:
            if self.base is None:
                return deltas  # a text encoder's module keeps its name (pass a base to place it)
            te = self._text_encoder(name)
            return None if te is None else [replace(d, target=te + _strip(d.target)[1]) for d in deltas]
        if not pieces:
            raise BadInputError(f"{where}: {name}: the parts of this fused tensor cannot be sized without the base; "
                                "pass --base")
        out = []
        for p in pieces:
            for d in deltas:
                part = d if p.lora_rows is None else d.output_rows(*p.lora_rows)
                if part is None:
                    other = "diffusers" if self.column == "original" else "original"
                    why = "its DoRA norm spans all its rows" if d.has_magnitude else "it has no per-row form"
                    raise BadInputError(f"{where}: {name}: a {d.label} update cannot be split by rows exactly for "
                                        f"the base's {p.module} ({why}); merge into the {dit.BASE_TITLES[other]} "
                                        "instead")
                for prefix in self.prefixes if self.base is not None else (self.prefix,):
                    target = prefix + p.module + _strip(d.target)[1]
                    if self.base is not None and target not in self.base:
                        return None
                    if p.lora_rows is None or not part.is_zero():  # a part the LoRA leaves at zero adds nothing
                        out.append(self._fit_input(replace(part, target=target, rows=p.rows)))
        return out

    def input_target(self) -> tuple[str, str, str] | None:
        """(the family's input projection weight in the base's names — canonical without a base —, the config
        key stating its width, the key that defaulted to it); None when the family has none (Family.input)."""
        spec = dit.TABLES[self.family].family.input
        if not spec:
            return None
        diffusers = self.column == "diffusers" or self.base is None
        prefix = self.prefix if self.base is not None else "transformer."
        return (prefix + (spec[0] if diffusers else spec[1]) + ".weight", spec[2] if diffusers else "",
                spec[3] if diffusers else "")

    def _fit_input(self, d: Delta) -> Delta:
        """A LoRA trained on the original's input width merged into a control model (img_in already a multiple
        of it wide): zero-padded to the base's width, the control columns untouched, as diffusers' loader pads it."""
        spec = self.input_target() if self.base is not None else None
        if spec is None or d.target != spec[0] or spec[0] not in self.base:
            return d
        have, s = tuple(self.base.info(d.target).shape), d.implied_shape()
        if s is None or len(s) != 2 or len(have) != 2 or s[0] != have[0] or s[1] >= have[1] or have[1] % s[1]:
            return d  # a control model stacks whole latents (Canny / Depth 2x, Fill 6x): anything else is wrong
        padded = d.input_padded(have[1])
        if padded is not None:
            self.padded.append(f"{d.target}: the LoRA's {s[1]} input columns of the base's {have[1]}")
        return padded or d

    def note(self) -> str:
        dialects = ", ".join(dit.DIALECT_TITLES[d] for d in sorted(self.dialects))
        expects = " or ".join(dit.BASE_TITLES.values())
        base = f"; base: {dit.BASE_TITLES[self.column]}" if self.layout is not None else ""
        return f"{dit.family_title(self.family)} LoRA, {dialects}; expects a {expects}{base}{self._alike()}"

    def _alike(self) -> str:
        if not self.alike:
            return ""
        others = " and ".join(dit.family_title(f) for f in self.alike)
        how = "the base decides" if self.layout is not None else "pass --base to decide"
        return f" (its module names fit {others} too: read as {dit.family_title(self.family)}'s; {how})"

    def summary(self) -> dict:
        out = {"family": self.family, "dialects": sorted(self.dialects),
               "base_layouts": list(dit.BASE_TITLES), "base_layout": self.column if self.layout else None,
               "also_fits": list(self.alike), **({"stated": True} if self.stated else {})}
        return {**out, "input_padded": self.padded} if self.padded else out
