"""llama.cpp GGUF LoRA adapters (`general.type = adapter`, `adapter.type = lora`). Spec: formats/gguf.md.

The header is walked here with every length and offset bounded by the file size before any tensor is
touched (GGUF files are untrusted input); the `gguf` package supplies the constants, the Q8_0 dequantizer and
the writer. Tensors are named `<GGUF base tensor>.lora_a|.lora_b` with numpy shapes A [r, in], B [out, r]
(ggml ne reversed), except `token_embd.weight.lora_a`, stored transposed ([vocab, r]); expert tensors are
3-D ([E, r, in] / [E, out, r]). One global `adapter.lora.alpha`: s = alpha / r per tensor, alpha 0 ⇒ s = 1.

Against an HF base, names map back to HF names (loraport/names/llm.py) and, for the Llama family, the rows of
q/k B are un-permuted (llama.cpp's converter permutes them for its RoPE layout). Without a base the GGUF
names are kept (for a GGUF base).

Size: a bounded walker for an untrusted header (`GGUFFile`, ~150 lines) plus the reader and writer of one
format; the walker is the piece that can move out on its own.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraport.adapter import Adapter, LoraDelta
from loraport.deltas_experts import ExpertPart, ExpertsLoraDelta, combine_stacked
from loraport.errors import BadInputError, Inexpressible, UnsafeInputError
from loraport.paths import regular
from loraport.formats import AdapterFormat, ReadOptions, WriteOptions, register
from loraport.formats._common import lora_scale
from loraport.formats._experts import unstack_fused
from loraport.formats._llm import bake, common_value, oriented, require_lora_only, stack_experts
from loraport.names.gguf_map import ARCHS, UnknownArch, gguf_name, hf_names, refused
from loraport.names.llm import (
    expert_index,
    head_counts,
    num_experts,
    qk_kind,
    rope_permute_rows,
    rope_unpermute_rows,
    translate,
)

MAGIC = b"GGUF"
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
MAX_STRING = 1 << 24
MAX_STRINGS = 1 << 20  # items of a string array (a tokenizer vocabulary is ~256k)
MAX_META_BYTES = 1 << 28  # numeric metadata arrays, all together (kept as numpy arrays: 1 byte per byte)
MAX_DIM = 2**48  # elements along one dimension (what safetensors headers may hold too)
MAX_DIMS = 4
# value types (GGUF spec): fixed sizes, struct codes
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
T_STRING, T_ARRAY = 8, 9
# tensor types we read: ggml type -> (numpy dtype or None for block-quantized, block elems, block bytes)
_TYPES = {0: ("F32", np.float32, 1, 4), 1: ("F16", np.float16, 1, 2), 30: ("BF16", np.uint16, 1, 2),
          8: ("Q8_0", None, 32, 34)}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (ggml ne reversed)
    ggml_type: int
    begin: int
    end: int


class GGUFFile:
    """A bounded, validated view of a GGUF file: metadata dict and tensor table; tensors as fp32 torch."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(regular(path), "rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise BadInputError(f"{path}: not a GGUF file (only {size} bytes)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None
        self.size = size
        self.metadata: dict = {}
        self.value_types: dict[str, tuple[int, int | None]] = {}  # key -> (GGUF value type, array item type)
        self._meta_bytes = 0
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse()

    TYPES = _TYPES  # the ggml types this view reads
    MAX_DIMS = MAX_DIMS

    def _unknown_type(self, name: str, gtype: int) -> BadInputError:
        return BadInputError(f"{self.path}: tensor {name!r} has ggml type {gtype}; loraport reads "
                             "F32/F16/BF16/Q8_0 adapters (re-export with --outtype f16 or f32)")

    def _err(self, what: str) -> BadInputError:
        return BadInputError(f"{self.path}: corrupted GGUF ({what}); re-export the adapter")

    def _take(self, off: int, n: int) -> int:
        if n < 0 or off + n > self.size:
            raise self._err(f"field at byte {off} runs past the end of the file")
        return off + n

    def _unpack(self, fmt: str, off: int, n: int):
        self._take(off, n)
        return struct.unpack_from(fmt, self._mm, off)[0], off + n

    def _string(self, off: int) -> tuple[str, int]:
        n, off = self._unpack("<Q", off, 8)
        if n > MAX_STRING:
            raise self._err(f"string of {n} bytes at byte {off}")
        end = self._take(off, n)
        try:
            return self._mm[off:end].decode("utf-8"), end
        except UnicodeDecodeError:
            raise self._err(f"string at byte {off} is not UTF-8") from None

    def _value(self, vtype: int, off: int, depth: int = 0):
        if vtype in _SCALARS:
            fmt, n = _SCALARS[vtype]
            return self._unpack(fmt, off, n)
        if vtype == T_STRING:
            return self._string(off)
        if vtype == T_ARRAY and depth == 0:
            etype, off = self._unpack("<I", off, 4)
            self._etype = etype
            count, off = self._unpack("<Q", off, 8)
            min_size = _SCALARS[etype][1] if etype in _SCALARS else 8
            if etype not in _SCALARS and etype != T_STRING or count * min_size > self.size - off:
                raise self._err(f"array of {count} items of type {etype} at byte {off}")
            if etype in _SCALARS:
                fmt, n = _SCALARS[etype]
                end = self._take(off, n * count)
                self._meta_bytes += n * count
                if self._meta_bytes > MAX_META_BYTES:
                    raise self._err(f"more than {MAX_META_BYTES} bytes of metadata arrays")
                return np.frombuffer(self._mm, dtype=np.dtype(fmt), count=count, offset=off).copy(), end
            if count > MAX_STRINGS:
                raise self._err(f"string array of {count} items at byte {off} (at most {MAX_STRINGS})")
            items = []
            for _ in range(count):
                v, off = self._string(off)
                items.append(v)
            return items, off
        raise self._err(f"unknown value type {vtype} at byte {off}")

    def _parse(self) -> None:
        if self._mm[:4] != MAGIC:
            raise BadInputError(f"{self.path}: not a GGUF file (bad magic)")
        version, off = self._unpack("<I", 4, 4)
        if version not in (2, 3):
            if version & 0xFFFF == 0:
                raise BadInputError(f"{self.path}: big-endian GGUF is not supported")
            raise BadInputError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, off = self._unpack("<Q", off, 8)
        n_kv, off = self._unpack("<Q", off, 8)
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise self._err(f"{n_tensors} tensors / {n_kv} metadata entries")
        for _ in range(n_kv):
            key, off = self._string(off)
            vtype, off = self._unpack("<I", off, 4)
            val, off = self._value(vtype, off)
            if key in self.metadata:
                raise self._err(f"metadata key {key!r} appears twice")
            self.metadata[key] = val
            self.value_types[key] = (vtype, self._etype if vtype == T_ARRAY else None)
        infos = []
        for _ in range(n_tensors):
            info, off = self._tensor_info(off)
            infos.append(info)
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, (int, np.integer)) or align <= 0 or align & (align - 1):
            raise self._err(f"general.alignment {align!r}")
        self._place(infos, off + (-off) % int(align))

    def _tensor_info(self, off: int) -> tuple[tuple, int]:
        """One tensor-info record: ((name, shape in torch order, ggml type, data offset), next offset)."""
        name, off = self._string(off)
        nd, off = self._unpack("<I", off, 4)
        if not 1 <= nd <= self.MAX_DIMS:
            raise self._err(f"tensor {name!r} has {nd} dimensions")
        ne = []
        for _ in range(nd):
            d, off = self._unpack("<Q", off, 8)
            if d >= MAX_DIM:  # with another dimension 0 the byte count is 0 and passes the size check
                raise self._err(f"tensor {name!r} has a dimension of {d}")
            ne.append(d)
        gtype, off = self._unpack("<I", off, 4)
        toff, off = self._unpack("<Q", off, 8)
        return (name, tuple(reversed(ne)), gtype, toff), off

    def _place(self, infos: list[tuple], data: int) -> None:
        """Each tensor's byte span in the data section (from `data`): known type, inside the file, no overlap."""
        spans = []
        for name, shape, gtype, toff in infos:
            if name in self.tensors:
                raise self._err(f"tensor {name!r} appears twice")
            if gtype not in self.TYPES:
                raise self._unknown_type(name, gtype)
            _, _, blk, bbytes = self.TYPES[gtype]
            n = math.prod(int(x) for x in shape)
            if shape[-1] % blk:
                raise self._err(f"tensor {name!r}: row of {shape[-1]} is not a multiple of the block size {blk}")
            nbytes = n // blk * bbytes
            begin = data + int(toff)
            if begin + nbytes > self.size or nbytes > self.size:
                raise self._err(f"tensor {name!r} ({nbytes} bytes at {begin}) runs past the end of the file")
            self.tensors[name] = GGUFTensor(name, tuple(int(x) for x in shape), gtype, begin, begin + nbytes)
            spans.append((begin, begin + nbytes, name))
        spans.sort()
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._err(f"tensors {n0!r} and {n1!r} overlap")

    def get(self, name: str) -> torch.Tensor:
        """fp32 copy (F16/BF16/Q8_0 widened exactly)."""
        t = self.tensors[name]
        kind, dt, blk, bbytes = _TYPES[t.ggml_type]
        n = math.prod(t.shape)
        if kind == "Q8_0":
            import gguf

            raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.end - t.begin, offset=t.begin)
            raw = raw.reshape(*t.shape[:-1], t.shape[-1] // blk * bbytes)
            arr = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).astype(np.float32)
            return torch.from_numpy(np.ascontiguousarray(arr)).reshape(t.shape)
        arr = np.frombuffer(self._mm, dtype=dt, count=n, offset=t.begin).copy()
        if kind == "BF16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float().reshape(t.shape)
        return torch.from_numpy(arr).float().reshape(t.shape)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass


def _is_gguf(path: Path) -> bool:
    try:
        with open(regular(path), "rb") as f:
            return f.read(4) == MAGIC
    except (OSError, UnsafeInputError):
        return False


def _meta_str(meta: dict, key: str):
    v = meta.get(key)
    return v if isinstance(v, str) else None


@dataclass(frozen=True)
class GgufWriteOptions(WriteOptions):
    """arch: general.architecture for an adapter in GGUF naming that does not record one."""

    arch: str | None = None


@register(write=GgufWriteOptions)
class GgufFormat(AdapterFormat):
    name = "gguf"
    title = "llama.cpp GGUF LoRA"
    spec = "gguf"
    output_is_dir = False
    own_naming = ("blk.", "token_embd")

    @classmethod
    def detect(cls, path: Path) -> int:
        if path.is_file() and _is_gguf(path):
            return 95
        return 0

    # --- read ----------------------------------------------------------------------------------------
    @classmethod
    def read_with(cls, path: Path, base, opts: ReadOptions) -> Adapter:
        if not path.is_file():
            raise BadInputError(f"{path}: a GGUF adapter is a single .gguf file")
        f = GGUFFile(path)
        try:
            return _read(f, path, base)
        finally:
            f.close()

    # --- write ---------------------------------------------------------------------------------------
    @classmethod
    def write_with(cls, adapter: Adapter, path: Path, base, opts: GgufWriteOptions) -> list[Path]:
        adapter = unstack_fused(adapter, base, "GGUF")
        require_lora_only(adapter, "GGUF", stacked=True)
        for d in adapter.deltas:
            if d.has_magnitude:
                raise Inexpressible(f"GGUF LoRA has no DoRA magnitudes ({d.target}); DoRA depends on the base "
                                    "weight, so it cannot be baked into B").hint(
                    "--lossy", "with --base BASE re-factors the exact DoRA update to low rank")
        hf_named = any(not d.target.startswith(("blk.", "token_embd", "output")) for d in adapter.deltas)
        arch, permute, nh, nkv = _write_arch(adapter, base, hf_named, opts.arch)
        to_gguf = _namer(adapter, base, arch) if hf_named else None
        # one alpha for the file: the commonest alpha (= s·r); other modules get s baked into B
        rs = [(d.scale, d.A.shape[0]) for d in adapter.deltas if d.has_lora_factors]
        rs += [(p.scale, p.A.shape[1]) for d in adapter.deltas if d.stacked for p in d.parts]
        alpha = float(common_value([s * r for s, r in rs]))
        tensors: list[tuple[str, torch.Tensor]] = []
        experts: dict[str, dict[int, LoraDelta]] = defaultdict(dict)
        baked = 0
        for d in adapter.deltas:
            if d.stacked:
                if len(d.parts) != 1 or d.parts[0].out_rows is not None:
                    raise BadInputError(f"{d.target}: a fused gate_up expert update has no GGUF form")
                p = d.parts[0]
                name = d.target if not hf_named else None
                if name is None:
                    raise BadInputError(f"{d.target}: stacked HF expert tensors are not in the GGUF name table")
                f = p.scale / (alpha / p.A.shape[1])
                baked += f != 1.0
                tensors += [(name + ".lora_a", p.A), (name + ".lora_b", bake(p.B, f))]
                continue
            if hf_named:
                stack = translate(d.target, "hf", "gguf", experts=True)
                if stack is not None:
                    experts[stack][expert_index(d.target)] = oriented(d, False, base)
                    continue
                if base is not None and base.tied() and d.target == "lm_head.weight":
                    raise BadInputError("lm_head is tied to the embeddings in this base; llama.cpp has no separate "
                                        "output tensor to adapt (ggml-org/llama.cpp#9065)")
                name = to_gguf(d.target)
            else:
                name = d.target
            emb = name.startswith("token_embd")
            o = oriented(d, emb, base)
            r = o.A.shape[0]
            f = o.scale / (alpha / r)
            baked += f != 1.0
            B = bake(o.B, f)
            kind = qk_kind(d.target) if hf_named else None
            if permute and kind:
                B = rope_permute_rows(B, nh if kind == "q" else nkv)
            A = o.A.t() if emb else o.A  # llama.cpp's token_embd A is stored transposed
            tensors += [(name + ".lora_a", A), (name + ".lora_b", B)]
        for name, per in experts.items():
            n = num_experts(base.config if base is not None else None, max(per) + 1)
            A, B = stack_experts(per, n, lambda r: alpha / r)
            tensors += [(name + ".lora_a", A), (name + ".lora_b", B)]
        if baked:
            adapter.notes.append(f"{baked} module(s) with another alpha/scale rule: scale baked into lora_b "
                                 f"(file alpha {alpha:g})")
        _save(path, arch, alpha, tensors)
        return [path]


def _write_arch(adapter: Adapter, base, hf_named: bool, arch: str | None) -> tuple[str, bool, int, int]:
    """(GGUF architecture, whether q/k rows are permuted to llama.cpp's RoPE order, heads, kv heads): from the
    HF base for HF-named targets, else from `arch` or the adapter's own general.architecture."""
    if not hf_named:
        arch = arch or _meta_str(adapter.metadata, "general.architecture")
        if not arch:
            raise BadInputError("GGUF-named adapter without general.architecture; pass arch=")
        return arch, False, 0, 0
    if base is None or not base.config:
        raise BadInputError("writing GGUF from HF-named targets needs --base (the HF model folder with "
                            "config.json): the GGUF architecture and q/k head counts come from it")
    mt = base.model_type()
    if mt not in ARCHS:
        raise BadInputError(f"no GGUF architecture known for model_type {mt!r} (known: {', '.join(sorted(ARCHS))}; "
                            "see loraport/names/gguf_map.py)")
    arch, permute = ARCHS[mt].gguf, ARCHS[mt].permute
    try:
        nh, nkv = head_counts(base.config)
    except ValueError as e:
        raise BadInputError(f"{base.root}/config.json: {e}") from None
    return arch, permute, nh, nkv


def _namer(adapter: Adapter, base, arch: str):
    """HF target -> GGUF tensor name: gguf-py's TensorNameMap for `arch` first, loraport's table where the map
    has no spelling; modules the converter reshapes beyond a LoRA pair (DeepSeek MLA kv_b_proj) refused."""
    spec = ARCHS[base.model_type()]
    n_blocks = max([_block_count(base.config)] + [int(b) + 1 for d in adapter.deltas
                                                   for b in _BLOCK.findall(d.target)])

    def name(hf: str) -> str:
        bad = refused(hf, spec)
        if bad:
            raise BadInputError(f"{hf}: llama.cpp's converter splits {bad} per head for {arch} (MLA), so a LoRA on "
                                "it has no GGUF form; train the adapter without it")
        try:
            out = gguf_name(hf, arch, n_blocks)
        except UnknownArch as e:
            raise BadInputError(str(e)) from None
        out = out or translate(hf, "hf", "gguf")
        if out is None:
            raise BadInputError(f"{hf}: no GGUF name for this tensor in llama.cpp's {arch!r} map "
                                "(gguf-py tensor_mapping.py) nor loraport/names/llm.py")
        return out

    return name


_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def _block_count(config: dict | None) -> int:
    cfg = config or {}
    cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    n = cfg.get("num_hidden_layers")
    return n if isinstance(n, int) and 0 < n < 10_000 else 0


def _save(path: Path, arch: str, alpha: float, tensors: list[tuple[str, torch.Tensor]]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    from loraport._version import __version__

    w.add_string("loraport.version", __version__)  # lets `--overwrite` recognise the file (loraport/outputs.py)
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        if t.dtype == torch.bfloat16:
            w.add_tensor(name, t.view(torch.int16).numpy().view(np.uint16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif t.dtype == torch.float16:
            w.add_tensor(name, t.numpy())
        else:
            w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _lora_alpha(meta: dict, path: Path, notes: list[str]) -> float:
    """adapter.lora.alpha of a GGUF LoRA adapter (anything else refused); notes what llama.cpp does with it."""
    gtype = _meta_str(meta, "general.type")
    atype = _meta_str(meta, "adapter.type")
    if gtype == "model" or (gtype is None and atype is None):
        raise BadInputError(f"{path}: a GGUF model, not a LoRA adapter (general.type={gtype!r})")
    if atype != "lora":
        raise BadInputError(f"{path}: GGUF adapter.type is {atype!r}; loraport reads LoRA adapters ('lora')")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(alpha)):
        raise BadInputError(f"{path}: adapter.lora.alpha must be a number, got {alpha!r}")
    alpha = float(alpha)
    if alpha == 0:
        notes.append("adapter.lora.alpha missing or 0: scale 1 (llama.cpp rule)")
    tokens = meta.get("adapter.alora.invocation_tokens")
    if tokens is not None and np.size(tokens) > 0:
        notes.append("activated LoRA (aLoRA): llama.cpp applies it only after its invocation tokens; merged or "
                     "converted, it applies to every token")
    return alpha


def _lora_pairs(f: GGUFFile, path: Path, notes: list[str]) -> dict[str, dict[str, str]]:
    """tensor stem → {"lora_a": name, "lora_b": name}; norm tensors skipped as llama.cpp skips them."""
    pairs: dict[str, dict[str, str]] = defaultdict(dict)
    ignored = []
    for name in f.tensors:
        stem, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b") and stem:
            pairs[stem][leaf] = name
        elif "_norm" in name:
            ignored.append(name)  # mergekit-extract-lora norms: llama.cpp ignores them too
        else:
            raise BadInputError(f"{path}: unexpected tensor {name!r}; a GGUF LoRA holds <tensor>.lora_a/.lora_b")
    if ignored:
        notes.append(f"{len(ignored)} norm tensor(s) ignored (llama.cpp ignores them too)")
    return pairs


def _permutation(base, arch: str, path: Path) -> tuple[bool, int, int]:
    """(whether q/k rows are in llama.cpp's RoPE order for this HF base, heads, kv heads); an adapter made for
    another architecture than the base converts to is refused."""
    permute, nh, nkv = False, 0, 0
    mt = base.model_type()
    if mt in ARCHS:
        want, permute = ARCHS[mt].gguf, ARCHS[mt].permute
        if arch and arch != want:
            raise BadInputError(f"{path}: adapter is for GGUF architecture {arch!r}, the base "
                                f"({mt}) converts to {want!r}")
    elif arch in ("llama",):
        permute = True
    if permute:
        try:
            nh, nkv = head_counts(base.config)
        except ValueError as e:
            raise BadInputError(f"{base.root}/config.json: {e}") from None
    return permute, nh, nkv


def _map_names(base, arch: str, pairs, names: set[str]) -> dict[str, str]:
    """GGUF tensor -> the base's HF name by gguf-py's TensorNameMap for the architecture the base converts to
    (else the file's own); {} where gguf does not know it (loraport's table answers then)."""
    mt = base.model_type()
    arch = ARCHS[mt].gguf if mt in ARCHS else arch
    try:
        return hf_names(pairs, arch, names) if arch else {}
    except UnknownArch:
        return {}


def _read(f: GGUFFile, path: Path, base) -> Adapter:
    meta = f.metadata
    notes = []
    alpha = _lora_alpha(meta, path, notes)
    arch = _meta_str(meta, "general.architecture") or ""
    pairs = _lora_pairs(f, path, notes)

    to_hf = base is not None
    permute, nh, nkv = False, 0, 0
    names = set(base.names()) if to_hf else None
    by_map: dict[str, str] = {}
    if to_hf:
        permute, nh, nkv = _permutation(base, arch, path)
        by_map = _map_names(base, arch, pairs, names)
    else:
        notes.append("targets kept in GGUF naming (pass --base HF_MODEL to map them to HF names)")

    deltas = []
    for stem, p in pairs.items():
        if "lora_a" not in p or "lora_b" not in p:
            raise BadInputError(f"{path}: {stem!r} has only one of lora_a / lora_b")
        a, b = f.get(p["lora_a"]), f.get(p["lora_b"])
        if b.dim() == 3:
            deltas += _experts(path, stem, a, b, alpha, to_hf, names)
            continue
        emb = stem.startswith("token_embd")
        if emb:
            a = a.t().contiguous()  # stored [vocab, r]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise BadInputError(f"{path}: {stem}: lora_a {list(a.shape)} / lora_b {list(b.shape)} do not share a rank")
        r = a.shape[0]
        scale = lora_scale(alpha, r) if alpha else 1.0
        target = stem
        if to_hf:
            target = by_map.get(stem) or translate(stem, "gguf", "hf", names)
            if target is None:
                raise BadInputError(f"{path}: no HF name known for GGUF tensor {stem!r} (see loraport/names/llm.py)")
            kind = qk_kind(target)
            if permute and kind:
                b = rope_unpermute_rows(b, nh if kind == "q" else nkv)
        deltas.append(LoraDelta(target, A=a, B=b, scale=scale, transpose=emb, alpha=alpha or None,
                                scale_rule="alpha/r" if alpha else "none",
                                layer="embedding" if emb else "linear", source_key=p["lora_a"]))
    if not deltas:
        raise BadInputError(f"{path}: the GGUF adapter has no LoRA tensors")
    deltas = combine_stacked(deltas)
    if permute and any(qk_kind(d.target) for d in deltas):
        notes.append("q/k lora_b rows un-permuted from llama.cpp's RoPE order to the HF base's")
    return Adapter(deltas, "gguf", str(path), config={}, metadata={k: v for k, v in meta.items()
                                                                      if not isinstance(v, (list, np.ndarray))},
                   notes=notes, files=[str(path)], name=path.stem)


def _stacked_name(per_expert: str) -> tuple[str, str] | None:
    """The transformers ≥ 5 stacked tensor (and out-row part, "" for all rows) holding a per-expert HF weight."""
    stacked = translate(per_expert, "hf", "hf_stacked", experts=True)
    return stacked.partition(":")[::2] if stacked else None


def _experts(path, stem, a, b, alpha, to_hf, names) -> list:
    if a.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise BadInputError(f"{path}: {stem}: expert lora_a {list(a.shape)} / lora_b {list(b.shape)} are not "
                            "[E,r,in] / [E,out,r]")
    E, r = a.shape[0], a.shape[1]
    scale = lora_scale(alpha, r) if alpha else 1.0
    if to_hf:
        per_expert = translate(stem, "gguf", "hf", names, experts=True)
        if per_expert is None:
            raise BadInputError(f"{path}: no HF name known for GGUF tensor {stem!r}")
        hf = [per_expert.format(xid=e) for e in range(E)]
        stacked = _stacked_name(hf[0])
        if names is not None and hf[0] not in names and stacked is not None and stacked[0] in names:
            name, part = stacked
            rows = (int(part) * b.shape[1], (int(part) + 1) * b.shape[1]) if part else None
            return [ExpertsLoraDelta(name, parts=[ExpertPart(a, b, scale, rows, stem + ".lora_a")], source_key=stem)]
        return [LoraDelta(hf[e], A=a[e].contiguous(), B=b[e].contiguous(), scale=scale, transpose=False,
                          alpha=alpha or None, layer="linear", source_key=f"{stem}.lora_a[{e}]") for e in range(E)]
    return [ExpertsLoraDelta(stem, parts=[ExpertPart(a, b, scale, None, stem + ".lora_a")], source_key=stem)]

