"""Vocabulary rules of the plan: adapters trained on a resized vocabulary, tied embeddings, and the tokenizer
that goes with them.

* Resize: a replacement (PEFT `modules_to_save`, a saved embedding) with more or fewer rows than the base's
  input embedding / output head gives the output that many rows; every vocabulary tensor of the base must be
  resized alike, at weight 1, and config.json's vocab_size follows.
* Tie (`--tie-embeddings`): on a base whose head is tied to its input embedding, updates that set values
  (replacements, trained token rows) on one side only, or different ones on each side, cannot share one
  tensor. `auto` keeps the tie when both sides carry the identical update (or when only low-rank updates
  touch it: PEFT's own merge then moves the shared weight) and otherwise unties: the head becomes its own
  tensor (a copy of the embedding plus the head's updates) and config.json says tie_word_embeddings=false.
  `keep` forces one shared tensor (refused when the two sides were trained apart); `untie` always separates
  them when an update touches either.
* Tokenizer: the tokenizer files and chat template of the first adapter folder that has them replace the
  base's (the adapter was trained with them; its added tokens are the resized rows): the whole set when the
  adapter has a vocabulary file, else file by file.
"""

from __future__ import annotations

import filecmp
from dataclasses import replace
from pathlib import Path

from loraport import paths
from loraport.adapter import Adapter, Delta
from loraport.checkpoint import TIED_EMBEDDINGS, TIED_HEADS, Checkpoint, Shard
from loraport.engine.sources import resolve_target
from loraport.errors import PlanError

TIE_MODES = ("auto", "keep", "untie")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")  # a whole tokenizer


def is_head(target: str) -> bool:
    return target in TIED_HEADS or target.endswith(".lm_head.weight")


def vocab_tensors(base: Checkpoint) -> list[str]:
    """The base's input-embedding and head tensors (the ones a vocabulary resize changes)."""
    return [n for n in base.names() if n in TIED_EMBEDDINGS or is_head(n)]


# --- tie ---------------------------------------------------------------------------------------------------
def _sides(base: Checkpoint, emb: str, adapters: list[tuple[Adapter, float]]):
    """(head updates, embedding updates) as (delta, weight) pairs, in adapter order."""
    head, embed = [], []
    for a, w in adapters:
        for d in a.deltas:
            if is_head(d.target):
                head.append((d, w))
            elif emb in resolve_target(base, d.target):
                embed.append((d, w))
    return head, embed


def _same(xs: list[tuple[Delta, float]], ys: list[tuple[Delta, float]]) -> bool:
    return len(xs) == len(ys) and all(w1 == w2 and d1.same_update(d2) for (d1, w1), (d2, w2) in zip(xs, ys))


def tie_rule(base: Checkpoint, adapters: list[tuple[Adapter, float]], mode: str):
    """(base or its untied view, adapters, notes). See the module docstring."""
    if mode not in TIE_MODES:
        raise PlanError(f"unknown --tie-embeddings {mode!r} ({', '.join(TIE_MODES)})")
    emb = next((e for e in TIED_EMBEDDINGS if e in base), None)
    if not base.tied() or emb is None:
        return base, adapters, []
    head, embed = _sides(base, emb, adapters)
    if not head and not embed:
        return base, adapters, []
    sets = any(d.sets_values and d.num_params() > 0 for d, _ in head + embed)  # saved base copies: untrained
    exact = bool(head) and _same(head, embed)
    if mode == "keep" or (mode == "auto" and (exact or not sets)):
        if exact:  # one shared tensor gets the update once
            heads = {id(d) for d, _ in head}
            adapters = [(replace(a, deltas=[d for d in a.deltas if id(d) not in heads]), w) for a, w in adapters]
            return base, adapters, []
        if mode == "keep" and sets and head and embed:
            raise PlanError(f"the adapter trained {TIED_HEADS[0]} and {emb} apart, but the base ties them: one "
                            "shared tensor cannot hold both").hint("--tie-embeddings untie", "writes the head as "
                                                                   "its own tensor")
        return base, adapters, []
    which = "the head only" if not embed else "the embedding only" if not head else "head and embedding apart"
    note = (f"untied {TIED_HEADS[0]} from {emb}: the adapter trained {which}, so one shared tensor would lose it; "
            "config.json tie_word_embeddings=false (--tie-embeddings keep forces the shared tensor)")
    return untied_view(base, TIED_HEADS[0], emb), adapters, [note]


class _AliasFile:
    """A shard file that also serves `aliases` (new key → stored key): the untied head read from the embedding."""

    def __init__(self, inner, aliases: dict[str, str]):
        self._inner, self._aliases = inner, aliases
        self.tensors = {**inner.tensors, **{a: inner.tensors[k] for a, k in aliases.items()}}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def names(self) -> list[str]:
        return [*self._inner.names(), *self._aliases]

    def get(self, key: str):
        return self._inner.get(self._aliases.get(key, key))

    def raw(self, key: str):
        return self._inner.raw(self._aliases.get(key, key))

    def span(self, key: str):
        return self._inner.span(self._aliases.get(key, key))

    def release(self, key: str) -> None:
        self._inner.release(self._aliases.get(key, key))


def untied_view(base: Checkpoint, head: str, emb: str) -> Checkpoint:
    """The base with its head as a tensor of its own (stored next to the embedding when the base omits it) and
    a config that no longer ties them."""
    if type(base) is not Checkpoint:
        raise PlanError(f"{base.root}: untying the head needs a plain safetensors base").hint(
            "--tie-embeddings keep", "keeps the shared tensor")
    shards = list(base.shards)
    if head not in base:
        sh, key = base.shard_of(emb)
        i = shards.index(sh)
        shards[i] = Shard(sh.relpath, _AliasFile(sh.file, {head[len(sh.prefix):]: key}), sh.prefix)
    cfg = dict(base.config)
    cfg["tie_word_embeddings"] = False
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = {**cfg["text_config"], "tie_word_embeddings": False}
    view = Checkpoint(base.root, base.kind, shards, cfg, base.extra_files, base.index_files)
    view.config_rewritten = True
    return view


# --- resize ------------------------------------------------------------------------------------------------
def new_shapes(base: Checkpoint, adapters: list[tuple[Adapter, float]], allowed: bool) -> dict[str, tuple]:
    """{base tensor: its new shape} for the vocabulary tensors an adapter resizes; refuses what cannot load."""
    shapes: dict[str, tuple] = {}
    vocab = vocab_tensors(base)
    for a, w in adapters:
        for d in a.deltas:
            for name in resolve_target(base, d.target):
                have = tuple(base.info(name).shape)
                new = tuple(d.output_shape(have))
                if new == have or name not in vocab:
                    continue  # not a resize (or not a vocabulary tensor: the shape check refuses it)
                if not allowed:
                    raise PlanError(f"{a.path}: {d.source_key or d.target} resizes {name} from {have[0]} to "
                                    f"{new[0]} rows (a resized vocabulary), which only a merge into a model "
                                    "folder (config.json, tokenizer) can express")
                if w != 1.0:
                    raise PlanError(f"{a.path}: resizes the vocabulary of {name} ({have[0]} → {new[0]} rows); "
                                    f"such an adapter merges at weight 1 only, not {w}")
                if shapes.get(name, new) != new:
                    raise PlanError(f"{name}: adapters resize it to {shapes[name][0]} and {new[0]} rows")
                shapes[name] = new
    if shapes:
        rows = {s[0] for s in shapes.values()}
        missing = [n for n in vocab if n not in shapes and base.info(n).shape[0] not in rows]
        if len(rows) > 1 or missing:
            raise PlanError(f"the adapter resizes {', '.join(shapes)} to {sorted(rows)} rows but leaves "
                            f"{', '.join(missing) or 'another vocabulary tensor'} at "
                            f"{base.info(missing[0]).shape[0] if missing else '?'}; the merged model could not load")
    return shapes


def config_updates(base: Checkpoint, shapes: dict[str, tuple]) -> dict:
    """config.json keys to set for resized vocabulary tensors (vocab_size, where the config states it)."""
    if not shapes:
        return {}
    rows = next(iter(shapes.values()))[0]
    cfg = base.config if isinstance(base.config, dict) else {}
    text = cfg.get("text_config")
    if isinstance(text, dict) and "vocab_size" in text and "vocab_size" not in cfg:
        return {"text_config": {**text, "vocab_size": rows}}
    return {"vocab_size": rows}


# --- tokenizer ---------------------------------------------------------------------------------------------
def adapter_tokenizer(adapters: list[tuple[Adapter, float]]) -> tuple[dict[str, Path], list[str]]:
    """({file name: path}, warnings): the tokenizer files of the first adapter folder that has any."""
    chosen: dict[str, Path] = {}
    warns: list[str] = []
    for a, _ in adapters:
        folder = Path(a.path)
        if not folder.is_dir():
            continue
        files = {n: paths.member(folder, folder / n) for n in TOKENIZER_FILES if (folder / n).is_file()}
        if not files:
            continue
        if not chosen:
            chosen = files
        elif files.keys() != chosen.keys() or any(not filecmp.cmp(files[n], chosen[n], shallow=False) for n in files):
            warns.append(f"{a.path}: its tokenizer differs from the first adapter's, which the output carries")
    return chosen, warns


def tokenizer_size(files: dict[str, Path]) -> int | None:
    """1 + the largest token id of a `tokenizer.json` (its model's vocabulary and added tokens), or None when
    there is no such file to read."""
    from loraport.jsonfile import read_json

    p = files.get("tokenizer.json")
    if p is None:
        return None
    tj = read_json(p, "tokenizer")
    vocab = tj.get("model", {}).get("vocab") if isinstance(tj.get("model"), dict) else None
    ids = list(vocab.values()) if isinstance(vocab, dict) else []
    if isinstance(vocab, list):  # Unigram: [token, score] pairs, ids in order
        ids = [len(vocab) - 1] if vocab else []
    ids += [t.get("id") for t in tj.get("added_tokens") or [] if isinstance(t, dict)]
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    return max(ids) + 1 if ids else None


def check_tokenizer(files: dict[str, Path], base: Checkpoint, shapes: dict[str, tuple]) -> None:
    """Refuse an adapter tokenizer with token ids the merged embedding has no row for: the adapter was trained on
    a resized vocabulary but saved without its resized embedding."""
    emb = next((e for e in TIED_EMBEDDINGS if e in base), None)
    n = tokenizer_size(files)
    if emb is None or n is None:
        return
    rows = (shapes.get(emb) or tuple(base.info(emb).shape))[0]
    if n > rows:
        raise PlanError(f"{files['tokenizer.json']}: the adapter's tokenizer has token ids up to {n - 1}, but the "
                        f"merged {emb} has {rows} rows: the adapter was trained on a resized vocabulary and saved "
                        "without its embedding; save it again with save_pretrained(save_embedding_layers=True)")
