"""The whole tensors a PEFT adapter saves beside its LoRA factors, sorted by what they are, never by key order:

* `<m>.modules_to_save.<leaf>` — the trained copy of a `modules_to_save` module (written by
  `save_embedding_layers`); `<m>.<leaf>` — the same trained copy (written by the wrapper's own state dict);
  `<m>.original_module.<leaf>` — the untrained original, ignored. When both trained spellings are there they
  must be equal.
* `<m>.base_layer.<leaf>` and `<m>.token_adapter.base_layer.<leaf>` — PEFT's saved copy of the (possibly
  resized) base layer under a LoRA or trainable tokens: it replaces the base tensor, 0 trained parameters; so
  does a plain embedding / head weight that `modules_to_save` does not name (saved because it was resized).
* `<m>.token_adapter.trainable_tokens_delta` — the trained rows of `trainable_token_indices` (TrainableTokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from loraport.adapter import Delta, ReplaceDelta
from loraport.deltas_tokens import TokenRowsDelta
from loraport.errors import BadInputError
from loraport.names.llm import is_embedding

_TRAINED = re.compile(r"\.modules_to_save(?:\.default)?\.")
_ORIGINAL = re.compile(r"\.original_module\.")
_TOKENS = re.compile(r"^(?P<mod>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
_SAVED_BASE = re.compile(r"\.(?:token_adapter\.)?base_layer\.")


@dataclass
class SavedTensors:
    trained: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save copies by target
    plain: dict[str, torch.Tensor] = field(default_factory=dict)  # plain keys: trained copies, trainable biases
    saved_base: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT's saved base layers by target
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # trained token rows by module
    originals: int = 0

    @staticmethod
    def kind(k: str) -> str:
        """What key `k` (prefix removed) holds: tokens, trained, original, saved_base or plain."""
        if _TOKENS.match(k):
            return "tokens"
        if _TRAINED.search(k):
            return "trained"
        if _ORIGINAL.search(k):
            return "original"
        if _SAVED_BASE.search(k):
            return "saved_base"
        return "plain"

    def put(self, k: str, t: torch.Tensor) -> bool:
        """Store `k`; False when it is a key this module does not know (a `lora_*` or other token-adapter key)."""
        kind = self.kind(k)
        if kind == "tokens":
            self.tokens[_TOKENS.match(k).group("mod")] = t
        elif kind == "trained":
            self.trained[_TRAINED.sub(".", k)] = t
        elif kind == "original":
            self.originals += 1
        elif kind == "saved_base":
            self.saved_base[_SAVED_BASE.sub(".", k)] = t
        elif "token_adapter" in k:
            return False
        else:
            self.plain[k] = t
        return True

    def deltas(self, cfg: dict, where: str, prefix: str) -> tuple[list[Delta], list[str]]:
        """The replacement and token-row deltas, with notes for `inspect`."""
        notes: list[str] = []
        out: list[Delta] = []
        for k in sorted(set(self.trained) | set(self.plain)):
            t = self.trained.get(k)
            p = self.plain.get(k)
            if t is not None and p is not None and not (t.shape == p.shape and torch.equal(t, p)):
                raise BadInputError(f"{where}: {prefix}{k} and its modules_to_save copy differ; which one was "
                                    "trained cannot be told (re-save the adapter with PEFT)")
            untrained = t is None and _resized_copy(cfg, k)
            out.append(ReplaceDelta(k, value=t if t is not None else p, saved_base=untrained, source_key=prefix + k))
        for k, v in self.saved_base.items():
            out.append(ReplaceDelta(k, value=v, saved_base=True, source_key=prefix + k))
        for mod, v in self.tokens.items():
            idx = token_indices(cfg, mod, where)
            if v.dim() != 2 or v.shape[0] != len(idx):
                raise BadInputError(f"{where}: {prefix}{mod}.token_adapter.trainable_tokens_delta holds "
                                    f"{list(v.shape)} for {len(idx)} trainable_token_indices")
            out.append(TokenRowsDelta(f"{mod}.weight", indices=idx, values=v,
                                      source_key=f"{prefix}{mod}.token_adapter.trainable_tokens_delta"))
        if self.originals:
            notes.append(f"{self.originals} original_module copies ignored (untrained; the trained copy is used)")
        if self.tokens:
            notes.append(f"trainable tokens: {sum(len(token_indices(cfg, m, where)) for m in self.tokens)} row(s) "
                         f"set in {len(self.tokens)} tensor(s)")
        return out, notes


def _resized_copy(cfg: dict, k: str) -> bool:
    """A plain embedding or head weight that `modules_to_save` does not name: PEFT's copy of the resized layer
    (`save_embedding_layers`), not trained."""
    mod = k.removesuffix(".weight")
    if mod == k or not (is_embedding(k) or mod.rsplit(".", 1)[-1] == "lm_head"):
        return False
    names = cfg.get("modules_to_save") or []
    return not any(isinstance(n, str) and (mod == n or mod.endswith("." + n)) for n in names)


def token_indices(cfg: dict, mod: str, where: str) -> tuple[int, ...]:
    """The `trainable_token_indices` of module `mod`: a list (the input embedding, and a head tied to it) or a
    {module name: list} dict matched on the end of the module path; a tied head follows the one embedding."""
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, dict):
        hits = [v for k, v in spec.items() if isinstance(k, str) and (mod == k or mod.endswith("." + k))]
        if not hits and len(spec) == 1:  # the head tied to the one trained embedding shares its indices
            hits = list(spec.values())
        spec = hits[0] if len(hits) == 1 else None
    if not isinstance(spec, list) or not spec or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                         for i in spec):
        raise BadInputError(f"{where}: trainable tokens saved for {mod}, but trainable_token_indices gives no list of "
                            "token ids for it")
    if len(set(spec)) != len(spec):
        raise BadInputError(f"{where}: trainable_token_indices for {mod} repeats a token id")
    return tuple(spec)
