"""The GGUF base source: a llama.cpp GGUF model (one file) served like any other base — canonical (HF) tensor
names, shapes in torch order, one tensor at a time dequantized to fp32 (`loraport.quant.ggml`), and each
tensor's stored bytes and ggml type for the GGUF sink to copy or re-quantize (spec: formats/gguf.md, "GGUF
bases").

Names: for the LLM architectures of `loraport.names.llm.GGUF_ARCH` every tensor the name table knows is
served under its HF name (`blk.0.attn_q.weight` → `model.layers.0.self_attn.q_proj.weight`), so PEFT, GGUF and
other adapters plan against it unchanged; the rest keep their GGUF names. Where llama.cpp's converter permuted
the q/k rows for its RoPE (the Llama family) they are un-permuted on reading and permuted back by the sink,
which is exact (a row shuffle; quantization blocks lie along rows). A model without `output.weight` ties the
head to `token_embd.weight` (config's tie_word_embeddings, as llama.cpp does).

DiT models as ComfyUI-GGUF ships them (`general.architecture` flux / wan / qwen_image: any architecture not in
GGUF_ARCH) keep their single-file names, which the DiT tables plan against as for the .safetensors file; their
shape quirks are served here: 5-D tensors (Wan's patch embedding) are read, and a tensor stored as [n/256, 256]
with `comfy.gguf.orig_shape.<name>` is served in that shape and re-quantized in its stored one.

The header is walked by `loraport.formats.gguf.GGUFFile` (every length and offset bounded by the file size);
a type with no quantizer here (IQ*, TQ*, MXFP4) is written, once updated, in the nearest type with at least as
many bits per weight (`ggml.writable`, with a warning); a type loraport cannot read is refused by name before
anything is written.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from loraport.checkpoint import Checkpoint
from loraport.errors import BadInputError
from loraport.formats.gguf import GGUFFile
from loraport.names.llm import GGUF_ARCH, qk_kind, rope_permute_rows, rope_unpermute_rows, translate
from loraport.quant import ggml
from loraport.safetensors_io import TensorInfo

# general.architecture -> the HF model_type whose names and q/k order it uses (first of GGUF_ARCH wins)
ARCH_MODEL_TYPE: dict[str, str] = {}
for _mt, (_arch, _) in GGUF_ARCH.items():
    ARCH_MODEL_TYPE.setdefault(_arch, _mt)


class GgufBaseFile(GGUFFile):
    """The bounded GGUF walker, reading the tensor types of `loraport.quant.ggml` (a model, not an adapter)."""

    TYPES = {t.id: (t.name, None, t.block, t.nbytes) for t in (*ggml.TYPES.values(), *ggml.READ_ONLY.values())}
    MAX_DIMS = 5  # ComfyUI-GGUF's Wan / HunyuanVideo patch embedding (Conv3d), put back by tools/fix_5d_tensors.py

    def _unknown_type(self, name: str, gtype: int) -> BadInputError:
        known = ggml.UNSUPPORTED.get(gtype)
        what = f"ggml type {known}" if known else f"unknown ggml type {gtype}"
        return BadInputError(f"{self.path}: tensor {name!r} has {what}; loraport reads GGUF bases of "
                             f"{'/'.join(ggml.BY_NAME)} only (merge into the F16 or BF16 GGUF and quantize "
                             "it with llama-quantize)")

    def _err(self, what: str) -> BadInputError:
        return BadInputError(f"{self.path}: corrupted GGUF ({what}); re-download or re-convert the model")

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes (a read-only mapping: nothing here writes into them)."""
        t = self.tensors[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=t.end - t.begin, offset=t.begin)


def _int(meta: dict, key: str) -> int | None:
    v = meta.get(key)
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 else None


ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF: a tensor stored as [n/256, 256], its model shape here


def _orig_shape(f: GgufBaseFile, g: str) -> tuple[int, ...]:
    """The shape the model uses for GGUF tensor `g`: its stored shape, or ComfyUI-GGUF's recorded original
    (convert.py reshapes conv weights whose rows are not whole k-quant blocks; ComfyUI's loader undoes it)."""
    stored = f.tensors[g].shape
    v = f.metadata.get(ORIG_SHAPE + g)
    if v is None:
        return stored
    shape = tuple(int(x) for x in v) if isinstance(v, np.ndarray) and v.dtype.kind in "iu" else ()
    if not shape or min(shape) < 1 or math.prod(shape) != math.prod(stored):
        shown = str(v.tolist()[:8]) if isinstance(v, np.ndarray) else repr(v)[:60]  # one line, however long
        raise BadInputError(f"{f.path}: {ORIG_SHAPE}{g} = {shown} does not match the tensor's "
                            f"{math.prod(stored)} elements; the file is corrupted (re-convert it)")
    return shape


class GgufBase(Checkpoint):
    """A GGUF model as a base (see the module docstring)."""

    def __init__(self, path: Path):
        self.file = f = GgufBaseFile(path)
        meta = f.metadata
        self.arch = str(meta.get("general.architecture", ""))
        mt = ARCH_MODEL_TYPE.get(self.arch)
        self.permuted = bool(mt and GGUF_ARCH[mt][1])
        cfg: dict = {"model_type": mt or self.arch, "tie_word_embeddings": "output.weight" not in f.tensors}
        nh, nkv = _int(meta, f"{self.arch}.attention.head_count"), _int(meta, f"{self.arch}.attention.head_count_kv")
        if nh:
            cfg.update(num_attention_heads=nh, num_key_value_heads=nkv or nh)
        if self.permuted and not nh:
            raise BadInputError(f"{path}: no {self.arch}.attention.head_count in the metadata (needed to place the "
                                "q/k rows); the file is incomplete")
        Checkpoint.__init__(self, path.parent, "gguf-file", [], cfg, [], [])
        self.path = path
        self.gguf_of: dict[str, str] = {}  # served name -> GGUF name, in file order
        for g in f.tensors:
            hf = translate(g, "gguf", "hf") if mt else None
            name = hf if hf and hf not in self.gguf_of else g
            if name in self.gguf_of:
                raise BadInputError(f"{path}: tensors {self.gguf_of[name]!r} and {g!r} both map to {name!r}")
            self.gguf_of[name] = g
        self._where = {n: (None, g) for n, g in self.gguf_of.items()}  # type: ignore[misc]
        self.shape_of = {n: _orig_shape(f, g) for n, g in self.gguf_of.items()}  # served (torch) shapes

    @classmethod
    def open(cls, path: str | Path) -> GgufBase:
        return cls(Path(path))

    # --- the source interface ---------------------------------------------------------------------
    def ggml_type(self, name: str) -> ggml.GgmlType:
        """How `name` is stored."""
        gt = self.file.tensors[self.gguf_of[name]].ggml_type
        return ggml.TYPES.get(gt) or ggml.READ_ONLY[gt]

    def out_type(self, name: str) -> ggml.GgmlType:
        """How `name` is written once updated (its own type, or the nearest writable one for IQ* / TQ* / MXFP4)."""
        return ggml.writable(self.ggml_type(name))

    def info(self, name: str) -> TensorInfo:
        t = self.file.tensors[self.gguf_of[name]]
        return TensorInfo(name, torch.float32, self.shape_of[name], t.begin, t.end)

    def _heads(self, name: str) -> int | None:
        kind = qk_kind(name) if self.permuted else None
        if kind is None:
            return None
        return self.config["num_attention_heads"] if kind == "q" else self.config["num_key_value_heads"]

    def get(self, name: str) -> torch.Tensor:
        """fp32, in HF orientation (q/k rows un-permuted)."""
        return self.from_stored(name, self.file.raw(self.gguf_of[name]), self.ggml_type(name))

    def from_stored(self, name: str, data: torch.Tensor, t: ggml.GgmlType) -> torch.Tensor:
        """GGUF bytes of `name` in type `t` (stored or re-quantized) -> fp32 in HF orientation."""
        W = ggml.dequantize(data, t, self.file.tensors[self.gguf_of[name]].shape).reshape(self.shape_of[name])
        nh = self._heads(name)
        return rope_unpermute_rows(W, nh) if nh else W

    def to_stored(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """A tensor served by `get` back in the file's orientation and type: its GGUF bytes."""
        nh = self._heads(name)
        W = (rope_permute_rows(W, nh) if nh else W).reshape(self.file.tensors[self.gguf_of[name]].shape)
        return ggml.quantize(W, self.out_type(name))

    def raw(self, name: str) -> torch.Tensor:  # type: ignore[override]
        return self.file.raw(self.gguf_of[name])

    def span(self, name: str):
        return None

    def release(self, name: str) -> None:
        pass

    def layer_hint(self, name: str) -> str | None:
        return None

    def storage_of(self, name: str) -> str:
        return self.ggml_type(name).name

    def total_bytes(self) -> int:
        return self.file.size

    def n_elements(self, name: str) -> int:
        return math.prod(self.file.tensors[self.gguf_of[name]].shape)

    def close(self) -> None:
        self.file.close()
