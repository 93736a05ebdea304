"""Diffusion-transformer LoRAs in the readers and writers of the kohya and diffusers formats: a LoRA module named
in any dialect of a family (loraport/names/dit.py) placed on the base's tensors, split where the base keeps apart
what the LoRA's module fuses (a rank-r LoRA on qkv → three rank-r LoRAs sharing A), and, for writing, regrouped
into the dialect's modules (three LoRAs on q, k, v → one LoRA on qkv: rank r when they share A, else rank 3r).
Every step is exact or refused. Spec: formats/dit.md."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loraport.adapter import Delta
from loraport.errors import BadInputError, Inexpressible
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
    ("transformer_2", or "both")."""

    transformer: str = choice("transformer", "transformer_2", "both")


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

    @classmethod
    def detect(cls, modules, base, where, transformer: str = "transformer") -> DitNames | None:
        """None unless the modules are a DiT family's; refuses a base of another family in one line.
        `transformer`: the diffusers folder's transformer the LoRA goes into ("transformer_2", "both": Wan 2.2's
        second expert too)."""
        lay = dit.base_layout(base.names()) if base is not None else None
        fam, dialects = dit.family_of_modules(modules, lay.family if lay else None)
        if fam is None:
            return None
        if lay is None:
            return cls(fam, dialects, None, None)
        if lay.family != fam:
            raise BadInputError(f"{where}: a {dit.family_title(fam)} LoRA, but the base is {lay.title}; "
                                f"pass a {dit.family_title(fam)} base")
        prefix = lay.prefix
        if lay.column == "diffusers" and prefix in EXPERTS.values():
            prefix = "transformer."  # a two-expert folder: the first expert is the default
        prefixes = _experts(base, prefix, transformer, where)
        return cls(fam, dialects, base, lay, lay.column, prefixes[0], prefixes)

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
                        out.append(replace(part, target=target, rows=p.rows))
        return out

    def note(self) -> str:
        dialects = ", ".join(dit.DIALECT_TITLES[d] for d in sorted(self.dialects))
        expects = " or ".join(dit.BASE_TITLES.values())
        base = f"; base: {dit.BASE_TITLES[self.column]}" if self.layout is not None else ""
        return f"{dit.family_title(self.family)} LoRA, {dialects}; expects a {expects}{base}"

    def summary(self) -> dict:
        return {"family": self.family, "dialects": sorted(self.dialects),
                "base_layouts": list(dit.BASE_TITLES), "base_layout": self.column if self.layout else None}


# ================================================================================================= writing
def _target_module(target: str, prefix: str) -> tuple[str, str] | None:
    """(module without the prefix, ".weight" | ".bias") of a target under `prefix`, else None."""
    mod, suffix = _strip(target)
    if not suffix or not mod.startswith(prefix):
        return None
    return mod[len(prefix):], suffix


def _fuse(parts: list[tuple[Delta, tuple[int, int] | None]], total: int | None, where: str) -> Delta:
    """One LoRA on a fused tensor of `total` rows from LoRAs on row ranges of it: B stacked under a shared A
    when they share A and scale (rank r), else block-placed with the A's concatenated (rank Σr)."""
    if len(parts) == 1 and parts[0][1] is None:
        return parts[0][0]
    if total is None:
        raise BadInputError(f"{where}: the fused tensor's size is unknown (a part has no update); pass --base")
    if any(d.low_rank_factors() is None for d, _ in parts):  # the kind says whether it holds row parts exactly
        fused = type(parts[0][0]).from_row_parts(parts, total)
        if fused is None:
            d = next(d for d, _ in parts if d.low_rank_factors() is None)
            raise Inexpressible(f"{where}: a {d.label} update on part of a fused tensor has no form on the fused "
                                "tensor; LoRA, LoHa (output-axis DoRA) and full parts are combined exactly")
        return fused
    d0 = parts[0][0]
    same = all(d.scale == d0.scale and d.A.shape == d0.A.shape and torch.equal(d.A, d0.A) for d, _ in parts)
    dtype = d0.B.dtype
    if same:
        B = torch.zeros(total, d0.A.shape[0], dtype=dtype)
        for d, (a, b) in parts:
            B[a:b] = d.B
        return replace(d0, A=d0.A, B=B, rows=None)
    r = sum(int(d.A.shape[0]) for d, _ in parts)
    B = torch.zeros(total, r, dtype=torch.float32)
    c = 0
    for d, (a, b) in parts:
        k = int(d.A.shape[0])
        B[a:b, c:c + k] = d.B.float() * d.scale
        c += k
    A = torch.cat([d.A.float() for d, _ in parts])
    return replace(d0, A=A, B=B, scale=1.0, alpha=float(r), rows=None)


def regroup(adapter, column: str, base, where) -> tuple[list[tuple[str, Delta]], list[Delta], DitNames | None]:
    """The adapter's transformer deltas as (module in `column`, delta) — parts of one fused module combined —
    and the other deltas as they are; (…, None) when the adapter is not a DiT family's."""
    modules = [tuple(_spellings(d.target)) for d in adapter.deltas]
    names = DitNames.detect(modules, base, where)
    if names is None:
        return [], list(adapter.deltas), None
    table = dit.TABLES[names.family]
    groups: dict[tuple[str, str], list[tuple[Delta, tuple[int, int] | None]]] = defaultdict(list)
    rest = []
    for d in adapter.deltas:
        found = _target_module(d.target, names.prefix)
        # a bias (a full diff's diff_b) is placed by its weight's rows: only with the base's shape
        if found is None or not table.knows(found[0]) or (found[1] == ".bias" and names._shape(found[0]) is None):
            rest.append(d)
            continue
        for module, part, rows in _moved(d, found[0], names, table, column, where):
            groups[(module, found[1])].append((part, rows))
    out = []
    totals: dict[str, int | None] = {}
    for (mod, suffix), parts in sorted(groups.items(), key=lambda kv: kv[0][1] != ".weight"):  # weights first
        spec = table.spec(mod)
        total = None
        if spec is not None:
            shape = names._shape(mod) if names.column == column else None
            total = shape[0] if shape else (_base_total(table, mod, column, names) or _total(spec, parts))
        total = totals.setdefault(mod, total) if suffix == ".weight" else (total or totals.get(mod))
        out.append((mod, _fuse(parts, total, f"{where}: {mod}{suffix}")))
    return out, rest, names


def _moved(d: Delta, mod: str, names: DitNames, table, column: str, where):
    """[(module in `column`, the part of d that goes there, its rows there)] for a delta on module `mod`."""
    shape = names._shape(mod)
    own = d.implied_shape()
    h = shape[1] if shape else (int(own[1]) if own and len(own) == 2 else 0)
    total = shape[0] if shape else (int(own[0]) if own and d.rows is None else None)
    spec = table.spec(mod)
    if total is None and d.rows is not None and spec and "*" not in spec:
        total = len(spec) * h  # a row slice of a module fused by its parts' rule: it has all of them
    try:
        hits = table.translate(mod, names.column, column, h, total)
    except ValueError as e:
        raise BadInputError(f"{where}: {d.target}: {e}") from None
    if not hits:
        raise BadInputError(f"{where}: {d.target}: the parts of this fused tensor cannot be sized; pass --base")
    out = []
    for p in hits:
        if d.rows is not None and p.lora_rows not in (None, d.rows):
            continue  # another part of the fused tensor
        part = d if p.lora_rows is None or d.rows is not None else d.output_rows(*p.lora_rows)
        if part is None:
            raise Inexpressible(f"{where}: {d.target}: a {d.label} update cannot be split by rows exactly")
        rows = p.rows if p.rows is not None else (d.rows if p.lora_rows is None else None)
        out.append((p.module, replace(part, rows=None), rows))
    return out


def _base_total(table, mod: str, column: str, names: DitNames) -> int | None:
    """The rows of fused `mod` (spelled in `column`) from the base's separate tensors of its parts."""
    total = 0
    for _, values, idx in table.match(mod, column):
        cell = table.other(idx, names.column, values)
        shape = names._shape(cell[0]) if cell and cell[1] is None else None
        if shape is None:
            return None
        total += shape[0]
    return total or None


def _total(spec: tuple[str, ...], parts) -> int | None:
    """The rows of a fused tensor from the LoRAs on its parts: "h" parts are the input width; the "*" part is
    as tall as the LoRA on it (unknown when it has none)."""
    hs = {int(d.implied_shape()[1]) for d, _ in parts if d.implied_shape() and len(d.implied_shape()) == 2}
    if len(hs) != 1:
        return None
    h = hs.pop()
    if "*" not in spec:
        return len(spec) * h
    start = spec[:spec.index("*")].count("h") * h
    for _, r in parts:
        if r is not None and r[0] == start:
            return r[1] + spec[spec.index("*") + 1:].count("h") * h
    return None


def _spellings(target: str) -> list[str]:
    """A delta target as the dialects would spell its module (for family detection)."""
    mod, _ = _strip(target)
    names = [mod]
    for prefix in dit.BASE_PREFIXES["original"] + dit.BASE_PREFIXES["diffusers"]:
        if prefix and mod.startswith(prefix):
            names.append(mod[len(prefix):])
    out = []
    for n in names:
        out += [dit.spell("kohya", n), dit.spell("diffusers", n)]
    return out


def kohya_modules(adapter, base, where) -> list[tuple[str, Delta]] | None:
    """(kohya module name, delta) for every delta of a DiT adapter (transformer modules regrouped into the
    original's fused tensors, text encoders under the family's lora_te prefixes); None if not DiT."""
    grouped, rest, names = regroup(adapter, "original", base, where)
    if names is None:
        return None
    out = [(dit.spell("kohya", m), d) for m, d in grouped]
    comps = {c: pre for pre, c in dit.TABLES[names.family].family.text_encoders.items()}
    for d in rest:
        mod, suffix = _strip(d.target)
        comp, _, inner = mod.partition(".")
        if suffix == ".weight" and mod.startswith("lora_") and "." not in mod:
            out.append((mod, d))  # read without a base: already a kohya name
        elif suffix == ".weight" and comp in comps:
            out.append((kohya_name(comps[comp], te_spellings(inner)[0]), d))
        else:
            raise BadInputError(f"{where}: {d.target}: no kohya name for it in a {dit.family_title(names.family)} "
                                "LoRA")
    return out


def diffusers_deltas(adapter, base, path: Path | str):
    """The adapter with its transformer deltas as canonical `transformer.<diffusers module>.weight` LoRAs (q, k, v
    split from a fused module), None if not DiT."""
    grouped, rest, names = regroup(adapter, "diffusers", base, path)
    if names is None:
        return None
    return [replace(d, target=dit.spell("diffusers", m) + _strip(d.target)[1]) for m, d in grouped] + rest
