"""Output layout: which tensors land in which output file, under which key, in which dtype and shape —
computed from the plan before anything is written (headers are known up front, so each shard streams)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraport.engine.plan import FLOATS, MergePlan
from loraport.safetensors_io import itemsize


@dataclass
class OutEntry:
    name: str  # base tensor name (global)
    key: str  # key inside its output file
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class OutFile:
    relpath: str
    entries: list[OutEntry]  # one per written tensor
    sources: list[str]  # base tensor names whose output lands here, in order
    metadata: dict


def build_layout(plan: MergePlan, out_dtype: torch.dtype | None, quantizer, shard_size: int | None) -> list[OutFile]:
    base = plan.base
    per_src: dict[str, list[OutEntry]] = {}
    for name in base.names():
        info = base.info(name)
        shape = plan.shape_of(name)
        sh, key = base.shard_of(name)
        prefix = sh.prefix
        ents = None
        if quantizer is not None:
            q = quantizer.entries(name, shape, base.layer_hint(name))
            if q is not None:
                ents = [OutEntry(name, n[len(prefix):] if n.startswith(prefix) else n, dt, tuple(s))
                        for n, dt, s in q]
        if ents is None:
            dt = out_dtype if (out_dtype is not None and info.dtype in FLOATS) else info.dtype
            ents = [OutEntry(name, key, dt, shape)]
        per_src[name] = ents
    files: list[OutFile] = []
    for sh in base.shards:
        meta = dict(sh.file.metadata)
        names = [sh.prefix + k for k in sh.file.names()]
        files.append(OutFile(sh.relpath, [e for n in names for e in per_src[n]], names, meta))
    if shard_size:
        files = reshard(files, shard_size)
    return files


def nbytes(e: OutEntry) -> int:
    n = itemsize(e.dtype)
    for s in e.shape:
        n *= s
    return n


def reshard(files: list[OutFile], limit: int) -> list[OutFile]:
    """Re-split each folder's tensors into shards of at most `limit` bytes, HF-style names."""
    by_dir: dict[str, list[OutFile]] = {}
    for f in files:
        by_dir.setdefault(str(Path(f.relpath).parent), []).append(f)
    out: list[OutFile] = []
    for d, fs in by_dir.items():
        stem = "diffusion_pytorch_model" if any("diffusion_pytorch_model" in f.relpath for f in fs) else "model"
        meta = fs[0].metadata
        groups: list[tuple[list[OutEntry], list[str]]] = [([], [])]
        size = 0
        for f in fs:
            for src in f.sources:
                ents = [e for e in f.entries if e.name == src]
                n = sum(nbytes(e) for e in ents)
                if groups[-1][0] and size + n > limit:
                    groups.append(([], []))
                    size = 0
                groups[-1][0].extend(ents)
                groups[-1][1].append(src)
                size += n
        total = len(groups)
        for i, (ents, srcs) in enumerate(groups, 1):
            name = f"{stem}.safetensors" if total == 1 else f"{stem}-{i:05d}-of-{total:05d}.safetensors"
            rel = name if d in ("", ".") else f"{d}/{name}"
            out.append(OutFile(rel, ents, srcs, dict(meta)))
    return out

