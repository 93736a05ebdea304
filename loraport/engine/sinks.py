"""Sinks: where the stream's tensors go. `Sink` is the role; `SafetensorsSink` writes the layout's files (HF
folder, diffusers folder, single file; a bitsandbytes layout is the same files with the quantizer's entries) with
the streaming writer of `loraport.safetensors_io` (its chunked sink writes behind: loraport/chunk_sink.py);
`write_side_files` carries over the base's non-weight files and writes indexes and the updated config.json. ONNX
external data (export and bake) is `loraport.onnx.sink.OnnxDataSink`, the same role (the engine imports nothing
of loraport.onnx)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

import torch

from loraport import paths
from loraport._version import __version__
from loraport.adapter import Adapter
from loraport.checkpoint import Checkpoint
from loraport.engine.layout import OutEntry, OutFile, nbytes
from loraport.engine.vocab import TOKENIZER_FILES, VOCAB_FILES
from loraport.manifest import sha256_file
from loraport.safetensors_io import StreamingWriter


def provenance(adapters: list[tuple[Adapter, float]], dtype: str, quantize: str | None, hash_of=sha256_file) -> dict:
    """The metadata every output file carries: what made it, from which adapter files (by sha256)."""
    return {
        "loraport.version": __version__,
        "loraport.adapters": json.dumps([
            {"path": a.path, "format": a.format, "weight": w,
             "files": {Path(f).name: hash_of(f) for f in a.files if Path(f).is_file()},
             "scale_rules": sorted({d.scale_rule for d in a.deltas})}
            for a, w in adapters
        ]),
        "loraport.dtype": dtype,
        "loraport.quantize": quantize or "none",
    }


class Sink(Protocol):
    """What the stream hands tensors to, in layout order. `copy` and `write` return (bytes, token); the tensors
    written must stay unchanged until `wait(token)`. `converts`: `copy` also changes the dtype (in bounded
    pieces), so a tensor that only changes dtype is copied, never held whole."""

    converts: bool

    def copy(self, fi: int, name: str, source) -> tuple[int, object]: ...
    def write(self, fi: int, name: str, outs: list[torch.Tensor]) -> tuple[int, object]: ...
    def wait(self, token) -> None: ...
    def close_if_complete(self, fi: int) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def hashes(self) -> dict[str, tuple[str, int]]: ...


class SafetensorsSink:
    """One StreamingWriter per output file, opened at the file's first tensor (its header is known from the
    layout) and closed after its last. A write returns a token; the buffers written must stay unchanged until
    `wait(token)` (the writer hashes on its own thread)."""

    converts = False  # a dtype change is the stream's: cast once into a reused buffer

    def __init__(self, layout: list[OutFile], stage: Path, single: bool, metadata: dict, hash_outputs: bool):
        self.layout, self.stage, self.single = layout, stage, single
        self.metadata, self.hash_outputs = metadata, hash_outputs
        self.writers: dict[int, StreamingWriter] = {}
        self.left = [len(f.entries) for f in layout]  # entries still to write, per file
        self.entries: list[dict[str, list[OutEntry]]] = []
        for f in layout:
            by_name: dict[str, list[OutEntry]] = {}
            for e in f.entries:
                by_name.setdefault(e.name, []).append(e)
            self.entries.append(by_name)

    def _path(self, f: OutFile) -> Path:
        return self.stage if self.single else self.stage / f.relpath

    def _writer(self, fi: int) -> StreamingWriter:
        w = self.writers.get(fi)
        if w is None:
            f = self.layout[fi]
            path = self._path(f)
            path.parent.mkdir(parents=True, exist_ok=True)
            w = self.writers[fi] = StreamingWriter(path, [(e.key, e.dtype, e.shape) for e in f.entries],
                                                   {**f.metadata, **self.metadata}, hash=self.hash_outputs,
                                                   direct=True)
        return w

    def copy(self, fi: int, name: str, source: Checkpoint) -> tuple[int, tuple]:
        """`name` unchanged: its stored bytes, copied in the kernel when the source has a plain file span."""
        w = self._writer(fi)
        e = self.entries[fi][name][0]
        span = source.span(name)
        if span is not None:
            w.copy_range(e.key, *span)  # in the kernel, never through Python
        else:
            w.write(e.key, source.raw(name))
        self.left[fi] -= 1
        return nbytes(e), (w, w.last_seq)

    def write(self, fi: int, name: str, outs: list[torch.Tensor]) -> tuple[int, tuple]:
        """The tensors computed for `name`, in layout order (checked against the planned dtypes and shapes)."""
        w = self._writer(fi)
        ents = self.entries[fi][name]
        if len(outs) != len(ents):
            raise RuntimeError(f"{name}: {len(outs)} tensors for {len(ents)} entries")
        n = 0
        for e, t in zip(ents, outs):
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise RuntimeError(f"{name}: produced {t.dtype} {list(t.shape)}, planned {e.dtype} {list(e.shape)}")
            w.write(e.key, t)
            n += nbytes(e)
        self.left[fi] -= len(ents)
        return n, (w, w.last_seq)

    @staticmethod
    def wait(token: tuple) -> None:
        w, seq = token
        w.wait_hashed(seq)

    def close_if_complete(self, fi: int) -> None:
        if self.left[fi] == 0:
            self.writers[fi].close()

    def close(self) -> None:
        """Write the files that hold no tensors (their header only)."""
        for fi, f in enumerate(self.layout):
            if fi not in self.writers:
                self.writers[fi] = StreamingWriter(self._path(f), [], {**f.metadata, **self.metadata},
                                                   hash=self.hash_outputs)
                self.writers[fi].close()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()

    def hashes(self) -> dict[str, tuple[str, int]]:
        return {str(w.path): (w.sha256(), w.file_size) for w in self.writers.values() if w.sha256()}


def write_side_files(ckpt: Checkpoint, layout: list[OutFile], stage: Path, out_dtype, quantizer,
                     tokenizer: dict[str, Path] | None = None, config_updates: dict | None = None) -> None:
    """Copy every non-weight file; write indexes for multi-file folders; update config.json for the dtype,
    quantization and `config_updates` (a resized vocabulary). `tokenizer` (file name → path, the adapter's
    tokenizer) replaces every tokenizer file of the base when it has a vocabulary file (a whole tokenizer: never
    mixed with the base's), else only the files of the same name (a chat template, a tokenizer config)."""
    whole = any(n in VOCAB_FILES for n in tokenizer or {})
    for rel in ckpt.extra_files:
        if rel in (tokenizer or {}) or (whole and rel in TOKENIZER_FILES):
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(paths.member(ckpt.root, ckpt.root / rel), dst)  # checked again: never copy from outside
    for name, src in (tokenizer or {}).items():
        shutil.copy2(src, stage / name)
    _write_indexes(ckpt, layout, stage)
    cfg_path = stage / "config.json"
    rewritten = ckpt.config_rewritten  # e.g. a dequantized base drops quantization_config
    if cfg_path.is_file() and (out_dtype is not None or quantizer is not None or rewritten or config_updates):
        if rewritten:
            cfg = dict(ckpt.config)
        else:
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                return
        if out_dtype is not None:
            name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[out_dtype]
            for k in ("torch_dtype", "dtype"):
                if k in cfg or k == "torch_dtype":
                    cfg[k] = name
        if quantizer is not None:
            cfg = quantizer.config_update(cfg)
        cfg.update(config_updates or {})
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _write_indexes(ckpt: Checkpoint, layout: list[OutFile], stage: Path) -> None:
    """An HF weight index for every folder written as several files (or whose base had one)."""
    by_dir: dict[str, list[OutFile]] = {}
    for f in layout:
        by_dir.setdefault(str(Path(f.relpath).parent), []).append(f)
    old_index = {str(Path(i).parent): Path(i).name for i in ckpt.index_files}
    for d, fs in by_dir.items():
        if len(fs) == 1 and d not in old_index:
            continue
        stem = Path(fs[0].relpath).name.split("-0")[0].removesuffix(".safetensors")
        name = old_index.get(d, f"{stem}.safetensors.index.json")
        wm = {e.key: Path(f.relpath).name for f in fs for e in f.entries}
        idx = {"metadata": {"total_size": sum(nbytes(e) for f in fs for e in f.entries)}, "weight_map": wm}
        dst = stage / (name if d in ("", ".") else f"{d}/{name}")
        dst.write_text(json.dumps(idx, indent=2) + "\n", encoding="utf-8")
