"""The robustness report's rows for the base layouts added on 2026-12-05 (MXFP4 gpt-oss, fp8 block / ue8m0 /
compressed-tensors group and block, ComfyUI-GGUF DiT) and the DiT family mismatches:

* `cases(layout)`: the deliberate hostile bases of tests/_hostile_layouts.py as Trials of
  bench/robustness_classes.py (a refusal is a CLI exit 2 with one stderr line naming the fault; then the output
  must be absent and the inputs byte-identical);
* `fuzz(layout, n, rng)`: the undamaged base of that layout copied, 1-3 random byte / header / JSON mutations of
  its files (tests/_hostile_util.random_mutation, the adapters' fuzzer), sometimes a path mutation (symlinks
  out, FIFOs, /proc), then a whole `loraport.merge` into a fresh output and `inspect` of the base (alone and as
  the adapter's merge preview), each under the address-space cap and a 30 s limit. Lost: anything but a valid
  result or a one-line LoraportError, a hang, an output left behind by a refused merge, an input changed.
"""

from __future__ import annotations

import collections
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import _hostile_layouts as L  # noqa: E402
import _hostile_util as H  # noqa: E402

LAYOUTS = ("mxfp4", "fp8", "gguf-dit", "family")  # the case rows
SEEDS = L.SEEDS  # the fuzzed layouts: their undamaged bases


def _digests(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()
             and not f.is_symlink()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def cases(layout: str, tmp: Path) -> list:
    import robustness_classes as RC

    from loraport.cli import main

    def trial(case: L.Case, d: Path):
        box: dict = {}

        def run():
            from click.testing import CliRunner

            base, adapter = case.build(d)
            box.update(base=base, adapter=adapter, before=_digests(base, adapter), out=L.out_path(base, d))
            box["res"] = CliRunner().invoke(main, ["merge", "--base", str(base), "--adapter", str(adapter),
                                                   "--out", str(box["out"])])
            return box["res"]

        def check():
            if box["res"].exit_code != 0 and box["out"].exists():  # a valid merge (a zero scale) writes it
                return f"{box['out']} was written"
            if _digests(box["base"], box["adapter"]) != box["before"]:
                return "an input changed"
            return None

        say = next((s for s in case.say if "|" not in s), "")
        return RC.Trial(case.id, run, expect=case.expect, say=say, check=check, limit=30)

    out = []
    for i, c in enumerate(x for x in L.cases() if x.layout == layout):
        d = tmp / f"c{i}"
        d.mkdir()
        out.append(trial(c, d))
    return out


def _gist(msg: str) -> str:
    """A refusal's kind, for the report's histogram: its words with paths, names and numbers dropped."""
    import re

    words = re.sub(r"\S*/\S*|'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\d+", "", msg.split(";")[0]).split()
    return " ".join(words[:8])


def _attempt(fn) -> object:
    """"ok", or the LoraportError `fn` raised (anything else propagates: lost)."""
    from loraport.errors import LoraportError

    try:
        with H.memory_cap(), H.time_limit(30):
            fn()
        return "ok"
    except LoraportError as e:
        return e


def _trial(copy: Path, adapter: Path, out: Path) -> tuple[object, str | None]:
    """Merge the mutated base, then `inspect` it alone and as the base of the adapter's merge preview: (the
    merge's outcome, what went wrong or None)."""
    from loraport.api import inspect, merge

    before = _digests(copy, adapter)
    r = _attempt(lambda: merge(copy, [str(adapter)], out, hash_cache=False))
    if r != "ok" and not H.clean_message(r):
        return r, f"merge: not a one-line message: {str(r)[:200]!r}"
    if r != "ok" and out.exists():
        return r, "output written on a refusal"
    for what, fn in (("inspect", lambda: inspect(copy)), ("inspect --base", lambda: inspect(adapter, base=copy))):
        ri = _attempt(fn)
        if ri != "ok" and not H.clean_message(ri):
            return r, f"{what}: not a one-line message: {str(ri)[:200]!r}"
    if _digests(copy, adapter) != before:
        return r, "an input changed"
    return r, None


def fuzz(layout: str, n: int, rng) -> dict:
    c = collections.Counter()
    c["max_s"] = 0.0
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="lplay-") as td:
        template, adapter = L.SEEDS[layout](Path(td))
        for _ in range(n):
            ch = H.Chooser(rng=rng)
            with tempfile.TemporaryDirectory(prefix="lplay-", dir=scratch) as it:
                copy = Path(it) / template.name
                (shutil.copytree if template.is_dir() else shutil.copy2)(template, copy)
                structural = layout == "gguf-dit" and ch.integer(0, 1) == 0
                if structural:  # half the GGUF iterations: hostile metadata values, then 0-1 byte mutations
                    c["structural mutations"] += 1
                descs = [L.random_flux_gguf(copy, ch)] if structural else []
                descs += [H.random_mutation(copy, ch) for _ in range(ch.integer(0 if structural else 1, 3))]
                if ch.integer(0, 4) == 0:
                    descs.append(H.path_mutation(copy, ch))
                    c["path mutations"] += 1
                c["iterations"] += 1
                t0 = time.perf_counter()
                try:
                    r, problem = _trial(copy, adapter, Path(it) / ("merged" if copy.is_dir() else "merged"
                                                                  + copy.suffix))
                except Exception as e:  # noqa: BLE001 - counted as lost
                    c["lost"] += 1
                    c["hangs" if isinstance(e, H.Hang) else "internal errors"] += 1
                    print(f"  LOST {layout} {descs}: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                    continue
                finally:
                    c["max_s"] = max(c["max_s"], time.perf_counter() - t0)
                if problem:
                    c["lost"] += 1
                    print(f"  LOST {layout} {descs}: {problem}", file=sys.stderr)
                    continue
                c["valid" if r == "ok" else "clean error"] += 1
                if r != "ok":
                    c["says: " + _gist(str(r))] += 1
    return dict(c)
