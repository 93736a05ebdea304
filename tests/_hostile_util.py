"""Shared machinery for the hostile-input, fuzz and robustness tests (and bench/robustness_report.py).

* `seeds()` discovers every adapter fixture under fixtures/*/ that some registered reader accepts, with the
  base it plans against (if any), so readers added later are covered without editing the tests.
* `hostile_cases(seed)` lists the deliberate bad inputs for a seed (per file type: safetensors header attacks,
  truncations, JSON configs of the wrong type, malicious pickles, GGUF counts of 2^60, ...).
* `random_mutation(seed, root, chooser)` is the fuzzer's mutator, driven either by hypothesis or by a seeded
  `random.Random`, so the report script replays the same kinds of mutations as the test.
* `exercise(path, seed)` runs what a user's `loraport merge` would: read with the forced format, plan against
  the base, compute merged tensors. It returns "ok" or the LoraportError; anything else propagates.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import resource
import shutil
import signal
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
REGRESSIONS = FIXTURES / "regressions"
SKIP_AREAS = {"makers", "regressions", "hostile"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUGE = 2**60


# ------------------------------------------------------------------------------------------------ seeds
@dataclass(frozen=True)
class Seed:
    path: Path  # a fixture adapter (file or folder)
    format: str
    base: Path | None  # a fixture base the adapter plans against strictly, if one exists

    @property
    def label(self) -> str:
        return f"{self.format}:{self.path.relative_to(FIXTURES)}"

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(f for f in self.path.rglob("*") if f.is_file())


def _candidates(area: Path, depth: int = 3) -> Iterator[Path]:
    stack = [(area, 0)]
    while stack:
        d, k = stack.pop()
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            yield p
            if p.is_dir() and k + 1 < depth:
                stack.append((p, k + 1))


def _open_base(p: Path):
    from loraport.checkpoint import Checkpoint
    from loraport.errors import LoraportError

    try:
        return Checkpoint.open(p)
    except (LoraportError, OSError):
        return None


_SEEDS: list[Seed] | None = None


def seeds() -> list[Seed]:
    """Every fixture adapter that reads cleanly, one Seed each (cached per process)."""
    global _SEEDS
    if _SEEDS is not None:
        return _SEEDS
    from loraport.errors import LoraportError
    from loraport.formats import formats, load_adapter
    from loraport.merging import build_plan

    fmts = formats()
    found: list[Seed] = []
    for area in sorted(p for p in FIXTURES.iterdir() if p.is_dir() and p.name not in SKIP_AREAS):
        paths = list(_candidates(area))
        bases = []
        for p in paths:
            rel = p.relative_to(area).as_posix()
            looks = p.is_dir() and ((p / "config.json").is_file() or (p / "model_index.json").is_file()) or (
                "base" in rel and (p.is_dir() and any(p.glob("*.safetensors")) or p.suffix == ".safetensors"))
            if looks:
                ck = _open_base(p)
                if ck is not None:
                    bases.append((p, ck))
        taken: list[Path] = []
        for p in paths:
            if any(t in p.parents for t in taken) or any(p == b for b, _ in bases) or any(
                    b in p.parents for b, _ in bases):
                continue
            scored = sorted(((f.detect(p), n) for n, f in fmts.items()), reverse=True)
            if not scored or scored[0][0] <= 0:
                continue
            name = scored[0][1]
            chosen: Path | None = None
            ok = False
            mine = sorted(bases, key=lambda b: -len(os.path.commonprefix([b[0].name, p.name])))
            for bp, ck in [(None, None), *mine]:
                try:
                    ad = load_adapter(p, format=name, base=ck)
                except (LoraportError, OSError, ValueError, KeyError, TypeError):
                    continue
                if ck is None:
                    ok = True
                    continue
                try:
                    build_plan(ck, [(ad, 1.0)], strict=True)
                except (LoraportError, ValueError, KeyError, TypeError, RuntimeError):
                    continue
                ok, chosen = True, bp
                break
            if ok and fmts[name].mergeable or ok and chosen is None:
                found.append(Seed(p, name, chosen))
                taken.append(p)
    _SEEDS = found
    return found


def seeds_by_format() -> dict[str, list[Seed]]:
    out: dict[str, list[Seed]] = {}
    for s in seeds():
        out.setdefault(s.format, []).append(s)
    return out


def copy_seed(seed: Seed, dst_dir: Path, name: str = "hostile_input") -> Path:
    """A private copy of the seed (same file name suffix) to mutate."""
    dst = dst_dir / (name + (seed.path.suffix if seed.path.is_file() else ""))
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    if seed.path.is_dir():
        shutil.copytree(seed.path, dst)
    else:
        shutil.copy2(seed.path, dst)
    return dst


# ------------------------------------------------------------------------------------------------ exercise
_BASES: dict[Path, object] = {}


def base_of(seed: Seed):
    if seed.base is None:
        return None
    if seed.base not in _BASES:
        _BASES[seed.base] = _open_base(seed.base)
    return _BASES[seed.base]


def exercise(path: Path, seed: Seed):
    """Read `path` as seed.format and, when the seed has a base, plan and compute every merged tensor.
    Returns "ok" or the LoraportError raised; any other exception propagates (a bug)."""
    from loraport.errors import LoraportError
    from loraport.formats import load_adapter
    from loraport.merging import build_plan, merged_tensor

    base = base_of(seed)
    try:
        ad = load_adapter(path, format=seed.format, base=base)
        str(ad.deltas[0].target)
    except LoraportError as e:
        return e
    try:
        if base is not None:
            plan = build_plan(base, [(ad, 1.0)], strict=False)
            for name in list(plan.updates)[:64]:
                merged_tensor(plan, name, "cpu")
    except LoraportError as e:
        e.stage = "plan"  # merge() prefixes plan errors with the adapter path; build_plan alone may not
        return e
    return "ok"


# ------------------------------------------------------------------------------------------------ limits
@contextmanager
def memory_cap(extra: int = 3 << 30):
    """Lower this process's soft address-space limit to what it uses now + `extra` (restored afterwards):
    an allocation sized from an unchecked header fails instead of taking the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = vm + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield cap
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise Hang in the main thread if the body runs longer than `seconds` (Python-level loops)."""
    def _alarm(signum, frame):
        raise Hang(f"took longer than {seconds}s")

    prev = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, prev)


# ------------------------------------------------------------------------------------------------ file kinds
def kind_of(p: Path) -> str:
    name = p.name.lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".json"):
        return "json"
    if name.endswith(PICKLE_SUFFIXES):
        return "pickle"
    if name.endswith(".gguf"):
        return "gguf"
    return "bytes"


def st_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(header: dict | bytes, body: bytes) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def _tensor_keys(h: dict) -> list[str]:
    return [k for k in h if k != "__metadata__"]


def _float_key(h: dict) -> str | None:
    return next((k for k in _tensor_keys(h) if h[k].get("dtype") in ("F32", "F16", "BF16")
                 and math.prod(h[k]["shape"]) > 0), None)


def malicious_pickle(path: Path, marker: Path, zipped: bool = True, via: str = "system") -> None:
    """A pickle whose unpickling would create `marker` (through os.system or builtins.exec)."""
    import io

    import torch

    class _Evil:
        def __reduce__(self):
            if via == "system":
                return (os.system, (f"touch {marker}",))
            import builtins
            return (builtins.exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    payload = pickle.dumps({"lora.weight": _Evil()}, protocol=2)
    if not zipped:
        path.write_bytes(payload)
        return
    buf = io.BytesIO()
    torch.save({"lora.weight": torch.zeros(2)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for it in zin.infolist():
            data = zin.read(it.filename)
            zout.writestr(it, payload if it.filename.endswith("data.pkl") else data)


def zip_bomb(path: Path, n: int = 50_000_000) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"lora.weight": torch.zeros(n, dtype=torch.uint8)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for it in zin.infolist():
            zi = zipfile.ZipInfo(it.filename)
            zi.compress_type = zipfile.ZIP_DEFLATED if "/data/" in it.filename else zipfile.ZIP_STORED
            zout.writestr(zi, zin.read(it.filename))


# ------------------------------------------------------------------------------------------------ hostile cases
@dataclass
class Case:
    name: str
    file: str  # relative to the seed copy ("" = the copy itself)
    apply: Callable[[Path], None]
    expect: str  # "error": must be a clean LoraportError; "any": clean error or a valid result


def _st_cases(f: Path) -> list[tuple[str, Callable[[Path], None], str]]:
    data = f.read_bytes()
    h, body = st_split(data)
    (n,) = struct.unpack("<Q", data[:8])
    keys = _tensor_keys(h)
    k0 = keys[0] if keys else None
    fk = _float_key(h)
    size = len(data)
    cases: list[tuple[str, Callable[[Path], None], str]] = []

    def put(b: bytes):
        return lambda p: p.write_bytes(b)

    def edit(fn):
        def go(p: Path):
            hh = json.loads(json.dumps(h))
            fn(hh)
            p.write_bytes(st_join(hh, body))
        return go

    for cut in sorted({0, 4, 8, 8 + n // 2, 8 + n, 8 + n + max(len(body) // 2, 1), size - 1}):
        if 0 <= cut < size and not (cut == 8 + n and not body):
            cases.append((f"truncated@{cut}", put(data[:cut]), "error"))
    cases += [
        ("header_len_beyond_file", put(struct.pack("<Q", size) + data[8:]), "error"),
        ("header_len_2^60", put(struct.pack("<Q", HUGE) + data[8:]), "error"),
        ("header_len_0", put(struct.pack("<Q", 0) + data[8:]), "error"),
        ("header_invalid_json", put(data[:8] + b"{" + b"\xff" * (n - 1) + body), "error"),
        ("header_not_object", put(st_join(b"[]", body)), "error"),
        ("header_deep_nesting", put(st_join(b"[" * 50000 + b"]" * 50000, body)), "error"),
        ("metadata_wrong_type", edit(lambda hh: hh.__setitem__("__metadata__", {"format": 1})), "error"),
    ]
    if k0 is not None:
        def setk(field, value, key=k0):
            return edit(lambda hh: hh[key].__setitem__(field, value))
        b0, e0 = h[k0]["data_offsets"]
        cases += [
            ("shape_2^60", setk("shape", [HUGE]), "error"),
            ("shape_2^30x2^30x2^30", setk("shape", [2**30, 2**30, 2**30]), "error"),
            ("shape_negative", setk("shape", [-1, 4]), "error"),
            ("shape_not_ints", setk("shape", ["4", 1.5]), "error"),
            ("offsets_2^60", setk("data_offsets", [HUGE, HUGE + (e0 - b0)]), "error"),
            ("offsets_beyond_data", setk("data_offsets", [len(body), len(body) + (e0 - b0)]), "error"),
            ("offsets_reversed", setk("data_offsets", [e0, b0]), "error" if e0 != b0 else "any"),
            ("offsets_negative", setk("data_offsets", [-8, e0 - b0 - 8]), "error"),
            ("dtype_unknown", setk("dtype", "F33"), "error"),
            ("dtype_not_string", setk("dtype", ["F32"]), "error"),
            ("entry_not_object", edit(lambda hh: hh.__setitem__(k0, [1, 2])), "error"),
            ("name_with_nul", edit(lambda hh: hh.__setitem__(k0 + "\x00x", hh.pop(k0))), "error"),
            ("name_with_dotdot", edit(lambda hh: hh.__setitem__("../../../../tmp/" + k0, hh.pop(k0))), "any"),
            ("name_with_slash", edit(lambda hh: hh.__setitem__("/etc/" + k0.replace(".", "/"), hh.pop(k0))), "any"),
        ]
        raw = json.dumps(h).encode()
        ent = json.dumps({k0: h[k0]}).encode()[1:-1]
        dup = raw[:-1] + b"," + ent + b"}"
        cases.append(("duplicate_key", put(st_join(dup, body)), "error"))
        others = [k for k in keys if k != k0 and h[k]["data_offsets"][1] > h[k]["data_offsets"][0]]
        if others and e0 > b0:
            k1 = others[0]
            b1, e1 = h[k1]["data_offsets"]
            nb = e1 - b1
            # k1 moved to overlap k0's bytes (same length, still inside the data)
            start = min(b0, len(body) - nb)
            if start >= 0 and not (start >= e0 or start + nb <= b0):
                span = [start, start + nb]
                cases.append(("offsets_overlap", edit(lambda hh: hh[k1].__setitem__("data_offsets", span)), "error"))
    if fk is not None:
        b, e = h[fk]["data_offsets"]
        dt = h[fk]["dtype"]
        for label, val in (("nan", float("nan")), ("inf", float("inf"))):
            pat = {"F32": struct.pack("<f", val), "F16": struct.pack("<e", val),
                   "BF16": struct.pack("<f", val)[2:]}[dt]
            cases.append((f"{label}_in_weights", put(data[:8 + n] + body[:b] + pat + body[b + len(pat):]), "any"))
    return cases


def _json_cases(f: Path) -> list[tuple[str, Callable[[Path], None], str]]:
    text = f.read_bytes()
    cases: list[tuple[str, Callable[[Path], None], str]] = [
        ("json_empty", lambda p: p.write_bytes(b""), "error"),
        ("json_truncated", lambda p: p.write_bytes(text[: max(1, len(text) // 2)]), "error"),
        ("json_not_object", lambda p: p.write_bytes(b"[1, 2, 3]"), "error"),
        ("json_deep_nesting", lambda p: p.write_bytes(b"[" * 50000 + b"]" * 50000), "error"),
        ("json_invalid_utf8", lambda p: p.write_bytes(b'{"a": "\xff\xfe"}'), "error"),
        ("json_huge_int", lambda p: p.write_bytes(text.replace(b"{", b'{"zz_huge": 1' + b"0" * 5000 + b",", 1)),
         "any"),
    ]
    try:
        obj = json.loads(text)
    except ValueError:
        return cases
    if not isinstance(obj, dict):
        return cases
    for k in list(obj)[:16]:
        v = obj[k]
        wrong = ("a string" if not isinstance(v, str) else 12345, [1, 2] if not isinstance(v, list) else {"x": 1},
                 None if v is not None else {"x": []})
        for i, w in enumerate(wrong):
            def go(p: Path, k=k, w=w):
                o = dict(obj)
                o[k] = w
                p.write_text(json.dumps(o))
            cases.append((f"config_{k}_wrong_type{i}", go, "any"))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            for label, w in (("nan", float("nan")), ("negative", -1), ("2^60", HUGE), ("zero", 0)):
                def go2(p: Path, k=k, w=w):
                    o = dict(obj)
                    o[k] = w
                    p.write_text(json.dumps(o))
                cases.append((f"config_{k}_{label}", go2, "any"))
    return cases


def _gguf_cases(f: Path) -> list[tuple[str, Callable[[Path], None], str]]:
    data = f.read_bytes()
    size = len(data)

    def put(b: bytes):
        return lambda p: p.write_bytes(b)

    def u64(off: int, v: int) -> bytes:
        return data[:off] + struct.pack("<Q", v) + data[off + 8:]

    cases = [(f"truncated@{c}", put(data[:c]), "error") for c in sorted({0, 4, 12, 20, 24, size // 2, size - 1})
             if c < size]
    cases += _gguf_field_cases(f, data, put)
    cases += [
        ("bad_magic", put(b"GGUX" + data[4:]), "error"),
        ("version_99", put(data[:4] + struct.pack("<I", 99) + data[8:]), "error"),
        ("tensor_count_2^60", put(u64(8, HUGE)), "error"),
        ("kv_count_2^60", put(u64(16, HUGE)), "error"),
        ("first_key_len_2^60", put(u64(24, HUGE)), "error"),
    ]
    return cases


def _gguf_field_cases(f: Path, data: bytes, put) -> list[tuple[str, Callable[[Path], None], str]]:
    """Field-level attacks located with gguf-py's reader: tensor dims/type/offset, string and array lengths."""
    try:
        import gguf
        r = gguf.GGUFReader(f)
    except Exception:  # noqa: BLE001 - no gguf-py, or a file it cannot parse: byte-level cases only
        return []

    def at(off: int, fmt: str, v: int) -> bytes:
        n = struct.calcsize(fmt)
        return data[:off] + struct.pack(fmt, v) + data[off + n:]

    cases = []
    if r.tensors:
        t = r.tensors[0]
        pos, offs = t.field.offset, []
        for part in t.field.parts:
            offs.append(pos)
            pos += part.nbytes
        name_len, _, n_dims, dims, ttype, toff = offs
        cases += [
            ("tensor_name_len_2^60", put(at(name_len, "<Q", HUGE)), "error"),
            ("tensor_n_dims_2^31", put(at(n_dims, "<I", 2**31 - 1)), "error"),
            ("tensor_dim_2^60", put(at(dims, "<Q", HUGE)), "error"),
            ("tensor_dim_0", put(at(dims, "<Q", 0)), "any"),
            ("tensor_type_9999", put(at(ttype, "<I", 9999)), "error"),
            ("tensor_offset_2^60", put(at(toff, "<Q", HUGE)), "error"),
            ("tensor_offset_misaligned", put(at(toff, "<Q", int(t.field.parts[-1][0]) + 1)), "error"),
        ]
        if len(r.tensors) > 1:
            t1 = r.tensors[1]
            n0, n1 = t.name.encode(), t1.name.encode()
            if len(n0) == len(n1):
                o1 = t1.field.offset + 8
                cases.append(("duplicate_tensor_name", put(data[:o1] + n0 + data[o1 + len(n0):]), "error"))
            evil = (b"../" * 40)[: len(n1) - 1] + b"x"
            cases.append(("tensor_name_dotdot", put(data[:t1.field.offset + 8] + evil
                                                    + data[t1.field.offset + 8 + len(n1):]), "any"))
    for fld in list(r.fields.values())[3:]:  # past the header counters
        if fld.types and fld.types[0] == gguf.GGUFValueType.STRING:
            pos = fld.offset + fld.parts[0].nbytes + fld.parts[1].nbytes + fld.parts[2].nbytes
            cases.append((f"kv_{fld.name}_strlen_2^60", put(at(pos, "<Q", HUGE)), "error"))
            cases.append((f"kv_{fld.name}_type_999", put(at(pos - 4, "<I", 999)), "error"))
            break
    for fld in list(r.fields.values())[3:]:
        if fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY:
            pos = fld.offset + fld.parts[0].nbytes + fld.parts[1].nbytes + fld.parts[2].nbytes + 4
            cases.append((f"kv_{fld.name}_array_len_2^60", put(at(pos, "<Q", HUGE)), "error"))
            break
    return cases


def _pickle_cases(f: Path) -> list[tuple[str, Callable[[Path], None], str]]:
    data = f.read_bytes()
    return [
        ("truncated@0", lambda p: p.write_bytes(b""), "error"),
        ("truncated@half", lambda p: p.write_bytes(data[: len(data) // 2]), "error"),
        ("zip_bomb", lambda p: zip_bomb(p), "error"),
    ]


def _bytes_cases(f: Path) -> list[tuple[str, Callable[[Path], None], str]]:
    data = f.read_bytes()
    size = len(data)
    cases = [("truncated@0", lambda p: p.write_bytes(b""), "error"),
             ("garbage", lambda p: p.write_bytes(bytes(range(256)) * 4), "error")]
    for cut in sorted({4, 8, 16, 64, size // 4, size // 2, size - 1}):
        if 0 < cut < size:
            cases.append((f"truncated@{cut}", lambda p, c=cut: p.write_bytes(data[:c]), "any"))
    for off in (0, 4, 8, 16):  # root offsets / lengths / counts in the first bytes of most binary formats
        for fmt, v in (("<I", 0xFFFFFFF0), ("<Q", HUGE)):
            if off + struct.calcsize(fmt) <= size:
                b2 = data[:off] + struct.pack(fmt, v) + data[off + struct.calcsize(fmt):]
                cases.append((f"u{8 * struct.calcsize(fmt)}@{off}=huge", lambda p, b2=b2: p.write_bytes(b2), "any"))
    return cases


_BY_KIND = {"safetensors": _st_cases, "json": _json_cases, "gguf": _gguf_cases, "pickle": _pickle_cases,
            "bytes": _bytes_cases}


def hostile_cases(seed: Seed) -> list[Case]:
    """Every deliberate bad input for this seed, one file changed per case."""
    out: list[Case] = []
    for f in seed.files():
        rel = "" if seed.path.is_file() else f.relative_to(seed.path).as_posix()
        for name, fn, expect in _BY_KIND[kind_of(f)](f):
            out.append(Case(f"{rel or f.name}:{name}", rel, fn, expect))
    return out


def target_file(copy: Path, rel: str) -> Path:
    return copy if not rel else copy / rel


# ------------------------------------------------------------------------------------------------ fuzzing
INTERESTING = [0, 1, 7, 8, 255, 2**31 - 1, 2**32, 2**48, HUGE, 2**63 - 1, 2**64 - 1]


class Chooser:
    """The fuzzer's source of choices: hypothesis' `data.draw` or a seeded random.Random."""

    def __init__(self, rng=None, data=None):
        self.rng, self.data = rng, data

    def integer(self, lo: int, hi: int) -> int:
        if self.data is not None:
            from hypothesis import strategies as st
            return self.data.draw(st.integers(lo, hi))
        return self.rng.randint(lo, hi)

    def pick(self, seq):
        return seq[self.integer(0, len(seq) - 1)]


def _mutate_json_value(obj, ch: Chooser, depth: int = 0):
    """Replace one leaf/value somewhere in obj with something hostile."""
    hostile = [None, True, -1, 0, HUGE, -HUGE, 1.5, float("nan"), float("inf"), "", "x" * 300, "../../etc",
               "a\x00b", [], [HUGE], [-1, 2], {}, {"dtype": "F32"}, "F33", "F32", "I64", [0, HUGE]]
    if isinstance(obj, dict) and obj and depth < 4 and ch.integer(0, 3):
        k = ch.pick(sorted(obj, key=str))
        if ch.integer(0, 5) == 0:  # rename the key
            obj[ch.pick(["", "..", "a/b", "x\x00", k + ".", "../" + str(k)])] = obj.pop(k)
            return obj
        obj[k] = _mutate_json_value(obj[k], ch, depth + 1)
        return obj
    if isinstance(obj, list) and obj and depth < 4 and ch.integer(0, 3):
        i = ch.integer(0, len(obj) - 1)
        obj[i] = _mutate_json_value(obj[i], ch, depth + 1)
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool) and ch.integer(0, 1):
        return obj + ch.pick([-1, 1, -8, 8, 4096])
    return ch.pick(hostile)


def _dump(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


BAD_PATTERNS = ["(a+)+$", "(.*a){20}", "(x|x)*y", r"(\w+)\1", "[", ".*" * 10, "a" * 5000, "(?<=x)y", "q_proj"]


def structural_mutation(data: bytes, kind: str, op: str, ch: Chooser) -> bytes | None:
    """'huge_count': a container with very many entries (JSON lists/objects, safetensors header entries);
    'pattern': rank/alpha pattern keys that backtrack, are invalid or are numerous (PEFT config, diffusers
    metadata). The mutated bytes, or None where the file has no such place."""
    n = ch.pick([10_000, 140_000])  # 140k: past the safetensors entry cap (131072)
    bad = ch.pick(BAD_PATTERNS) if ch.integer(0, 1) else None  # one bad key, or n // 10 costly ones
    bombs = {bad: 2} if bad is not None else _BOMB
    if kind == "json":
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        if op == "pattern":
            obj[ch.pick(["rank_pattern", "alpha_pattern"])] = bombs
        else:
            obj[ch.pick(sorted(obj, key=str) or ["x"])] = ch.pick([_LIST, _OBJECT])
        return _splice(_dump(obj), n)
    if kind != "safetensors":
        return None
    try:
        h, body = st_split(data)
    except (ValueError, struct.error):
        return None
    if not isinstance(h, dict):
        return None
    if op == "pattern":
        meta = h.setdefault("__metadata__", {}) if isinstance(h.get("__metadata__", {}), dict) else {}
        meta["lora_adapter_metadata"] = _diffusers_meta(n) if bad is None else json.dumps(
            {"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": bombs, "transformer.alpha_pattern": bombs})
        return st_join(_dump(h), body)
    head = _dump(h)[:-1]
    return st_join(head + (b"," if h else b"") + _blobs(n)["st_entries"] + b"}", body)


# The big containers are the same bytes every time for a given count: built once and spliced in where a
# placeholder was dumped (the fuzz loop runs 10k+ iterations; building 140k entries each time dominated it).
_BOMB, _LIST, _OBJECT = "@@lp-bomb:patterns@@", "@@lp-bomb:list@@", "@@lp-bomb:object@@"


@functools.cache
def _blobs(n: int) -> dict[str, bytes]:
    return {_BOMB: _dump({rf"l\.{i}\d*\.x": 2 for i in range(n // 10)}), _LIST: _dump([0] * n),
            _OBJECT: _dump({f"k{i}": i for i in range(n)}),
            "st_entries": ",".join(f'"x{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
                                   for i in range(n)).encode()}


def _splice(dumped: bytes, n: int) -> bytes:
    for mark in (_BOMB, _LIST, _OBJECT):
        dumped = dumped.replace(_dump(mark), _blobs(n)[mark])
    return dumped


@functools.cache
def _diffusers_meta(n: int) -> str:
    return _splice(_dump({"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": _BOMB,
                          "transformer.alpha_pattern": _BOMB}), n).decode()


PARSE_MAX = 1 << 20


def random_mutation(copy: Path, ch: Chooser) -> str:
    """Mutate one file of the seed copy in place; returns a description."""
    files = [copy] if copy.is_file() else sorted(f for f in copy.rglob("*") if f.is_file())
    f = ch.pick(files)
    data = bytearray(f.read_bytes())
    kind = kind_of(f)
    ops = ["flip", "truncate", "u64", "insert", "splice"]
    # the parsing mutators only on headers/JSON of at most 1 MiB: past that the file already holds a structural
    # bomb (10k entries stay under it), which byte mutations still reach; re-parsing it dominated the loop
    if kind == "safetensors" and len(data) >= 8 and struct.unpack("<Q", bytes(data[:8]))[0] <= PARSE_MAX:
        ops += ["st_header"] * 4 + ["st_values"] * 2 + ["huge_count", "pattern"]
    if kind == "json" and len(data) <= PARSE_MAX:
        ops += ["json"] * 4 + ["huge_count", "pattern"]
    op = ch.pick(ops)
    size = len(data)
    hot = min(size, 4096)
    if op == "flip" and size:
        for _ in range(ch.integer(1, 8)):
            i = ch.integer(0, hot - 1) if ch.integer(0, 3) else ch.integer(0, size - 1)
            data[i] = ch.integer(0, 255)
    elif op == "truncate":
        data = data[: ch.integer(0, max(size - 1, 0))]
    elif op == "u64" and size >= 8:
        i = ch.integer(0, min(size, 512) // 8 - 1) * 8 if ch.integer(0, 1) else ch.integer(0, max(hot - 8, 0))
        data[i:i + 8] = struct.pack("<Q", (ch.pick(INTERESTING) + ch.pick([0, 0, 1, -1])) % 2**64)
    elif op == "insert":
        i = ch.integer(0, hot)
        data[i:i] = bytes(ch.integer(0, 255) for _ in range(ch.integer(1, 16)))
    elif op == "splice" and size:
        a = ch.integer(0, size - 1)
        b = ch.integer(a, min(size, a + 64))
        j = ch.integer(0, size - 1)
        data[j:j + (b - a)] = data[a:b]
    elif op == "st_header":
        try:
            h, body = st_split(bytes(data))
        except (ValueError, struct.error):
            return f"{f.name}:{op}:skipped"
        h = _mutate_json_value(h, ch)
        try:
            data = bytearray(st_join(_dump(h), body))
        except (TypeError, ValueError):
            return f"{f.name}:{op}:skipped"
    elif op == "st_values":  # special values (NaN, Inf, huge, 0) inside a tensor: scalars like alpha too
        try:
            h, body = st_split(bytes(data))
            (n,) = struct.unpack("<Q", bytes(data[:8]))
            keys = [k for k in _tensor_keys(h) if h[k].get("dtype") in ("F32", "F16", "BF16")
                    and h[k]["data_offsets"][1] > h[k]["data_offsets"][0]]
            keys = [k for k in keys if 8 + n + h[k]["data_offsets"][1] <= len(data)]
        except (ValueError, struct.error, TypeError, AttributeError, KeyError, IndexError):
            return f"{f.name}:{op}:skipped"
        if not keys:
            return f"{f.name}:{op}:skipped"
        k = ch.pick(sorted(keys))
        b0, e0 = h[k]["data_offsets"]
        dt = h[k]["dtype"]
        w = 4 if dt == "F32" else 2
        for _ in range(ch.integer(1, 4)):
            v = ch.pick([float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 0.0, 1e-45, 65504.0])
            raw = struct.pack("<f", v) if dt == "F32" else (
                struct.pack("<e", v if abs(v) <= 65504 or v != v else float("inf")) if dt == "F16"
                else struct.pack("<f", v)[2:])
            i = 8 + n + b0 + ch.integer(0, (e0 - b0) // w - 1) * w
            data[i:i + w] = raw
    elif op in ("huge_count", "pattern"):
        out = structural_mutation(bytes(data), kind, op, ch)
        if out is None:
            return f"{f.name}:{op}:skipped"
        data = bytearray(out)
    elif op == "json":
        try:
            obj = json.loads(bytes(data))
        except ValueError:
            return f"{f.name}:{op}:skipped"
        try:
            data = bytearray(_dump(_mutate_json_value(obj, ch)))
        except (TypeError, ValueError):
            return f"{f.name}:{op}:skipped"
    f.write_bytes(bytes(data))
    return f"{f.name}:{op}"


SECRET = b"LORAPORT-SECRET-OUTSIDE-THE-FOLDER\n" * 8  # planted next to a seed copy by path_mutation
PATH_OPS = ("symlink to a secret outside", "symlink to /proc/self/pagemap", "FIFO", "symlink to /dev/zero",
            "dangling symlink", "symlink loop", "folder symlink out")


def path_mutation(copy: Path, ch: Chooser) -> str:
    """A structural mutation for the input-path policy (loraport/paths.py): replace one file of the seed copy
    (or add one beside them) with a symlink out of the folder to a planted secret, a symlink to an endless
    pseudo-file or a device, a FIFO, a dangling symlink or a symlink loop. Apply it last: the byte mutators
    read the files they pick."""
    secret = copy.parent / "secret-outside.txt"
    secret.write_bytes(SECRET)
    op = ch.pick(PATH_OPS)
    if copy.is_dir() and op == "folder symlink out":
        (copy / "linked").symlink_to(copy.parent, target_is_directory=True)
        return f"linked:{op}"
    files = [copy] if copy.is_file() else sorted(f for f in copy.rglob("*") if f.is_file() and not f.is_symlink())
    f = copy / "extra.json" if copy.is_dir() and (not files or ch.integer(0, 3) == 0) else ch.pick(files)
    if f.exists() or f.is_symlink():
        f.unlink()
    if op == "FIFO":
        os.mkfifo(f)
    else:
        f.symlink_to({"symlink to /proc/self/pagemap": "/proc/self/pagemap", "symlink to /dev/zero": "/dev/zero",
                      "dangling symlink": str(f.parent / "no-such-file"), "symlink loop": f.name}.get(op, secret))
    return f"{f.name}:{op}"


def copy_input(src: Path, dst: Path) -> None:
    """Copy a (possibly path-mutated) input without reading through its symlinks or special files: symlinks
    are copied as links, FIFOs and devices are left out."""
    import stat as _stat

    def special(d, names):
        return [n for n in names if not os.path.islink(os.path.join(d, n))
                and not _stat.S_ISREG(os.lstat(os.path.join(d, n)).st_mode)
                and not _stat.S_ISDIR(os.lstat(os.path.join(d, n)).st_mode)]

    if src.is_symlink():
        dst.symlink_to(os.readlink(src))
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, ignore=special)
    elif _stat.S_ISREG(os.lstat(src).st_mode):
        shutil.copy2(src, dst)


def clean_message(e: BaseException) -> bool:
    msg = str(e)
    return bool(msg.strip()) and "\n" not in msg.strip() and "Traceback" not in msg
