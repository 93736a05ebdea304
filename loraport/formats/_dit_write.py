"""Writing DiT LoRAs: an adapter's deltas regrouped into the modules of one column of its family's table (parts of
a fused tensor combined, a tensor split into its parts), for the kohya and diffusers writers. Reading and the
family / base-layout detection: loraport/formats/_dit.py. Spec: formats/dit.md."""


from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from loraport.adapter import Delta
from loraport.errors import BadInputError, Inexpressible
from loraport.names import dit
from loraport.names.sd import kohya_name, te_spellings
from loraport.formats._dit import DitNames, _strip


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
    wide = next((d for d in adapter.deltas if d.widens), None)
    if wide is not None:  # a Flux Control LoRA read against a base (formats/_dit_control.py)
        raise BadInputError(f"{where}: a control LoRA that widens {wide.target} to {wide.columns} input columns has "
                            "no LoRA-file form; merge it into the base instead")
    modules = [tuple(_spellings(d.target)) for d in adapter.deltas]
    read = adapter.family or {}
    names = DitNames.detect(modules, base, where, family=read["family"] if read.get("stated") else "")
    if names is None:
        return [], list(adapter.deltas), None
    read_columns = {dit.DIALECTS[d][0] for d in read.get("dialects") or () if d in dit.DIALECTS}
    if base is None and column not in (read_columns or {names.column}):
        # read without a base as the first family's: a family that fits as well but whose table sends the modules
        # elsewhere in `column` names them otherwise (one sending them alike — Chroma's pruned Flux rows — is no tie)
        ties = [f for f in names.alike or read.get("also_fits") or () if not _spelled_alike(adapter, names, f, column)]
        if ties:
            raise BadInputError(f"{where}: a {dit.family_title(names.family)} or "
                                f"{' or '.join(dit.family_title(f) for f in ties)} LoRA (it trains only modules "
                                "both have); pass --base, or --read-option family=NAME, to say which")
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


def _spelled_alike(adapter, names: DitNames, fam: str, column: str) -> bool:
    """True when `fam`'s table translates every module of the adapter to `column` exactly as names.family's does
    (same modules, same row parts): which of the two families the LoRA is then changes nothing in the output."""
    a, b = dit.TABLES[names.family], dit.TABLES[fam]
    for d in adapter.deltas:
        found = _target_module(d.target, names.prefix)
        if found is None or found[1] != ".weight":
            continue
        mod, own = found[0], d.implied_shape()
        h = int(own[1]) if own and len(own) == 2 else 0
        total = int(own[0]) if own and d.rows is None else None
        try:
            if a.translate(mod, names.column, column, h, total) != b.translate(mod, names.column, column, h, total):
                return False
        except ValueError:
            return False
    return True


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
    """The rows of a fused tensor from the LoRAs on its parts: "h" parts are the input width; a "*" part is as
    tall as the LoRA on it, and the "*" parts are equal (unknown when none has a LoRA)."""
    hs = {int(d.implied_shape()[1]) for d, _ in parts if d.implied_shape() and len(d.implied_shape()) == 2}
    if len(hs) != 1:
        return None
    h = hs.pop()
    if "*" not in spec:
        return len(spec) * h
    first = spec.index("*")
    start = spec[:first].count("h") * h
    only_stars_after = "h" not in spec[first:]
    for _, r in parts:
        if r is not None and (r[0] == start or (only_stars_after and r[0] > start)):
            return spec.count("h") * h + spec.count("*") * (r[1] - r[0])
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
