"""A lazy view of a base model: tensor names, shapes and dtypes, one memory-mapped tensor at a time, and
the non-weight files to carry over to an output.

Supported layouts:
* an HF model folder: config.json + model.safetensors, or shards + model.safetensors.index.json;
* a diffusers pipeline folder (model_index.json): each component folder (unet/, text_encoder/, ...) is read
  the same way and its tensor names are prefixed with "<component>." (as diffusers LoRA keys are);
* a single .safetensors file (e.g. an original Stable Diffusion checkpoint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loraport import paths
from loraport.errors import BadInputError
from loraport.safetensors_io import SafetensorsFile, TensorInfo

INDEX_SUFFIX = ".safetensors.index.json"

# Model types whose linear layers are transformers' Conv1D (weight stored [in, out]) and which modules.
CONV1D_LAYERS: dict[str, str] = {
    "gpt2": r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$",
    "openai-gpt": r"\.(c_attn|c_proj|c_fc)\.weight$",
    "imagegpt": r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$",
    "decision_transformer": r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$",
}

# Input-embedding names that an output head may be tied to (tie_word_embeddings), most common first.
TIED_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                   "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "embed_tokens.weight",
                   "wte.weight")
TIED_HEADS = ("lm_head.weight",)


@dataclass
class Shard:
    relpath: str  # path of the file relative to the checkpoint root ("" root for a single file)
    file: SafetensorsFile
    prefix: str  # prepended to the file's keys to form global names ("unet." for diffusers components)


class Checkpoint:
    config_rewritten = False  # True: `config` differs from the stored config.json (e.g. a dequantized base)

    def __init__(self, root: Path, kind: str, shards: list[Shard], config: dict | None,
                 extra_files: list[str], index_files: list[str]):
        self.root = root
        self.kind = kind
        self.shards = shards
        self.config = config or {}
        self.extra_files = extra_files
        self.index_files = index_files
        self._where: dict[str, tuple[Shard, str]] = {}
        for sh in shards:
            for key in sh.file.names():
                name = sh.prefix + key
                if name in self._where:
                    raise BadInputError(f"{root}: tensor {name!r} appears in two shards")
                self._where[name] = (sh, key)

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        p = paths.named(path)  # a named base may be a symlink, but to a regular file or a folder
        if not p.exists():
            raise BadInputError(f"base not found: {p}")
        if p.is_file():
            if p.suffix != ".safetensors":
                raise BadInputError(f"{p}: a base must be a .safetensors file or a model folder")
            return cls(p.parent, "safetensors-file", [Shard(p.name, SafetensorsFile(p), "")], None, [], [])
        files = paths.walk(p)  # every file of the folder, refused if one is a symlink leaving it
        if (p / "model_index.json").is_file():
            return cls._open_diffusers(p, files)
        shards, index_files = _folder_shards(p, p, "", "")
        if not shards:
            raise BadInputError(f"{p}: no .safetensors weights found (a .bin-only model? convert it to safetensors)")
        weight = {sh.relpath for sh in shards} | set(index_files)
        extra = _extra_files(files, weight)
        return cls(p, "hf-folder", shards, _read_json(p / "config.json", optional=True), extra, index_files)

    @classmethod
    def _open_diffusers(cls, p: Path, files: list[tuple[str, Path]]) -> Checkpoint:
        shards: list[Shard] = []
        index_files: list[str] = []
        for comp in sorted(d for d in p.iterdir() if d.is_dir()):
            s, idx = _folder_shards(p, comp, comp.name + "/", comp.name + ".")
            shards += s
            index_files += idx
        if not shards:
            raise BadInputError(f"{p}: diffusers folder without .safetensors weights")
        weight = {sh.relpath for sh in shards} | set(index_files)
        return cls(p, "diffusers-folder", shards, _read_json(p / "model_index.json"),
                   _extra_files(files, weight), index_files)

    # --- queries ----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        sh, key = self._where[name]
        return sh.file.tensors[key]

    def shard_of(self, name: str) -> tuple[Shard, str]:
        return self._where[name]

    def where(self, name: str) -> str:
        """The file holding `name` (for messages)."""
        return str(self._where[name][0].file.path)

    def get(self, name: str) -> torch.Tensor:
        sh, key = self._where[name]
        return sh.file.get(key)

    def raw(self, name: str) -> memoryview:
        """The stored bytes of `name` (for copying untouched tensors without decoding them)."""
        sh, key = self._where[name]
        return sh.file.raw(key)

    def span(self, name: str) -> tuple[int, int, int] | None:
        """(fd, offset, nbytes) of `name`'s stored bytes (see SafetensorsFile.span); None when the shard is not
        a plain safetensors file (a dequantizing view)."""
        sh, key = self._where[name]
        span = getattr(sh.file, "span", None)
        return span(key) if span is not None else None

    def release(self, name: str) -> None:
        """Drop `name`'s mapped pages from this process once consumed (they stay in the page cache)."""
        sh, key = self._where[name]
        release = getattr(sh.file, "release", None)
        if release is not None:
            release(key)

    def model_type(self) -> str:
        return str(self.config.get("model_type", "")) if isinstance(self.config, dict) else ""

    def layer_hint(self, name: str) -> str | None:
        pat = CONV1D_LAYERS.get(self.model_type())
        if pat and re.search(pat, name) and len(self.info(name).shape) == 2:
            return "conv1d"
        return None

    def tied(self) -> bool:
        cfg = self.config if isinstance(self.config, dict) else {}
        v = cfg.get("tie_word_embeddings")
        if v is None:
            text = cfg.get("text_config")
            v = text.get("tie_word_embeddings") if isinstance(text, dict) else None
        return bool(v) if v is not None else cfg.get("model_type") in ("gpt2",)

    def resolve(self, target: str) -> list[str]:
        """The base tensor(s) an adapter target updates: itself; for tied heads and embeddings, every saved
        copy of the shared weight; [] when nothing matches."""
        names = [target] if target in self else []
        if self.tied():
            if target in TIED_HEADS or target.endswith(".lm_head.weight"):
                emb = next((e for e in TIED_EMBEDDINGS if e in self), None)
                if emb and emb not in names:
                    names.append(emb)
            elif target in TIED_EMBEDDINGS:
                names += [h for h in TIED_HEADS if h in self and h not in names]
        return names

    def storage_of(self, name: str) -> str:
        """How `name` is stored: its dtype, or a quantized layout (`inspect --base` shows it)."""
        return str(self.info(name).dtype).removeprefix("torch.")

    def own_layout(self):
        """The quantizer that writes this base's own quantized layout back when no output dtype or quantization
        is asked for (an fp8 base); None: write the tensors as served."""
        return None

    def total_bytes(self) -> int:
        return sum(sh.file.path.stat().st_size for sh in self.shards)

    def close(self) -> None:
        for sh in self.shards:
            sh.file.close()


def _read_json(p: Path, optional: bool = False, root: Path | None = None):
    paths.member(root or p.parent, p)
    if not p.is_file():
        if optional:
            return None
        raise BadInputError(f"{p}: missing")
    from loraport.jsonfile import MAX_JSON, loads_json

    try:
        if p.stat().st_size > MAX_JSON:
            raise BadInputError(f"{p}: {p.stat().st_size} bytes of JSON (at most {MAX_JSON}); refused")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{p}: invalid JSON ({e})") from None
    return loads_json(text, str(p), p.name)


def _folder_shards(root: Path, folder: Path, rel: str, prefix: str) -> tuple[list[Shard], list[str]]:
    """The weight files of `folder` (the base folder `root` or one of its components); each must pass the
    input-path policy for `root`."""
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if indexes:
        idx = _read_json(indexes[0], root=root)
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise BadInputError(f"{indexes[0]}: no valid weight_map")
        files = list(dict.fromkeys(wm.values()))
        for f in files:
            if "/" in f or "\\" in f or f in ("", ".", ".."):
                raise BadInputError(f"{indexes[0]}: shard name {f!r} is not a plain file name")
            if not paths.member(root, folder / f).is_file():
                raise BadInputError(f"{indexes[0]}: shard {f} is missing")
        shards = [Shard(rel + f, SafetensorsFile(folder / f), prefix) for f in files]
        for sh in shards:
            for k in sh.file.tensors:
                if wm.get(k) != Path(sh.relpath).name:
                    raise BadInputError(f"{indexes[0]}: tensor {k!r} is in {sh.relpath} but the index says {wm.get(k)}")
        return shards, [rel + indexes[0].name]
    files = sorted(folder.glob("*.safetensors"))
    return [Shard(rel + f.name, SafetensorsFile(paths.member(root, f)), prefix) for f in files], []


def _extra_files(files: list[tuple[str, Path]], weight: set[str]) -> list[str]:
    """The non-weight files to carry over, from the policy-checked walk of the folder (`paths.walk`: regular
    files resolving inside it, or inside its Hugging Face blobs/ store for a cache snapshot)."""
    out = []
    for rel, f in files:
        if rel in weight or rel.startswith(".") or "/." in rel:
            continue
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx") or rel.endswith(".onnx_data"):
            continue  # other weight files are not carried over silently
        out.append(rel)
    return out
