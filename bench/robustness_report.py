"""Reproduce the README's robustness tables ("what we tried, what happened").

    python bench/robustness_report.py                 # everything, 2000 fuzz iterations per reader
    python bench/robustness_report.py --fuzz 10000 --jobs 2   # the README's run (~25 min on 2 shared cores)
    python bench/robustness_report.py --quick         # 5 interruption points instead of 36
    python bench/robustness_report.py --parts class:patterns reader:peft   # some parts only
    python bench/robustness_report.py --fuzz 500 --parts class:layouts-mxfp4 basefuzz:mxfp4  # a new base layout

Each part runs in its own child process (its peak RSS is the part's own; a part that never returns is a
hang): one per reader, one per hostile-input class of bench/robustness_classes.py (path policy, remote code,
pattern bombs, amplification caps, cache authenticity, batch collisions, malformed ONNX fields, rank 0, the
hostile MXFP4 / fp8 / GGUF-DiT bases and DiT family mismatches), the base checkpoints, the fuzzed base layouts
(bench/robustness_layouts.py: each undamaged base mutated, then merged) and the interruptions. Caches and keys
go to a temporary folder, never the user's.

For every reader in the registry (through the fixtures it accepts): the deliberate bad inputs of
tests/_hostile_util.hostile_cases (per seed, per file), planted code-executing pickles, and random mutations
(the fuzzer's mutator driven by a seeded RNG); then `loraport merge` subprocesses interrupted by SIGKILL /
SIGINT / SIGTERM at observed moments. "lost" counts anything that is not a clean one-line LoraportError or
a valid result (an internal error), a hang (a fuzz iteration past 30 s), a required error that was accepted,
a planted payload that ran, a secret read through a symlink, or a damaged output/input. Every bad input and
fuzz iteration runs under a capped address space (what the process uses + 3 GiB, tests/_hostile_util.memory_cap).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import _hostile_util as H  # noqa: E402

# per-iteration copies in memory when a tmpfs is there: on a loaded disk creating and removing them dominated
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

from loraport.errors import LoraportError, UnsafeInputError  # noqa: E402


def hostile(seeds: list[H.Seed]) -> dict:
    c = collections.Counter()
    for seed in seeds:
        for case in H.hostile_cases(seed):
            with tempfile.TemporaryDirectory(prefix="lprob-") as td:
                copy = H.copy_seed(seed, Path(td), "hostile_input")
                case.apply(H.target_file(copy, case.file))
                c["tried"] += 1
                try:
                    with H.memory_cap(), H.time_limit(60):
                        r = H.exercise(copy, seed)
                except Exception as e:  # noqa: BLE001 - counted as lost
                    c["lost"] += 1
                    c["hangs" if isinstance(e, H.Hang) else "internal errors"] += 1
                    print(f"  LOST {seed.label} {case.name}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                    continue
                if r == "ok":
                    c["valid"] += 1
                    if case.expect == "error":
                        c["lost"] += 1
                        print(f"  ACCEPTED {seed.label} {case.name}", file=sys.stderr)
                else:
                    c["clean error"] += 1
                    if not H.clean_message(r):
                        c["lost"] += 1
    return c


def pickles(seeds: list[H.Seed]) -> dict:
    c = collections.Counter()
    for seed in seeds:
        if seed.path.is_file() and seed.path.suffix not in (".safetensors", *H.PICKLE_SUFFIXES):
            continue
        with tempfile.TemporaryDirectory(prefix="lprob-") as td:
            marker = Path(td) / "PWNED"
            copy = H.copy_seed(seed, Path(td), "planted")
            files = [copy] if copy.is_file() else [f for f in copy.rglob("*") if f.is_file()]
            targets = [f for f in files if f.suffix in (".safetensors", *H.PICKLE_SUFFIXES)]
            for f in targets:
                f.unlink()
            for f in targets:
                for suf in H.PICKLE_SUFFIXES:
                    for via in ("system", "exec"):
                        g = f.with_suffix(suf)
                        H.malicious_pickle(g, marker, via=via)
                        r = H.exercise(g if copy.is_file() else copy, seed)
                        c["tried"] += 1
                        c["refused"] += isinstance(r, LoraportError)
                        c["refused as unsafe"] += isinstance(r, UnsafeInputError)
                        if marker.exists():
                            c["payload ran"] += 1
                        g.unlink()
    return c


def fuzz(seeds: list[H.Seed], n: int, rng: random.Random) -> dict:
    c = collections.Counter()
    c["max_s"] = 0.0
    start = time.perf_counter()
    for _ in range(n):
        ch = H.Chooser(rng=rng)
        seed = ch.pick(seeds)
        with tempfile.TemporaryDirectory(prefix="lprob-", dir=SCRATCH) as td:
            copy = H.copy_seed(seed, Path(td), "fuzzed")
            descs = [H.random_mutation(copy, ch) for _ in range(ch.integer(1, 3))]
            c["structural mutations"] += any(d.endswith((":huge_count", ":pattern")) for d in descs)
            if ch.integer(0, 4) == 0:  # symlinks out, /proc, FIFOs, devices (the input-path policy)
                descs.append(H.path_mutation(copy, ch))
                c["path mutations"] += 1
            c["iterations"] += 1
            t0 = time.perf_counter()
            try:
                with H.memory_cap(), H.time_limit(30):
                    r = H.exercise(copy, seed)
            except Exception as e:  # noqa: BLE001
                c["lost"] += 1
                c["hangs" if isinstance(e, H.Hang) else "internal errors"] += 1
                print(f"  LOST {seed.label} {descs}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            finally:
                c["max_s"] = max(c["max_s"], time.perf_counter() - t0)
            if r == "ok" and copy.is_dir() and descs[-1].endswith("secret outside"):
                c["lost"] += 1  # a symlink out of the folder was read
                c["leaks"] += 1
                print(f"  LOST {seed.label} {descs}: read through a symlink out of the folder", file=sys.stderr)
                continue
            if r != "ok" and not H.clean_message(r):
                c["lost"] += 1
                c["internal errors"] += 1
                print(f"  LOST {seed.label} {descs}: not a one-line message: {str(r)[:200]!r}", file=sys.stderr)
                continue
            c["valid" if r == "ok" else "clean error"] += 1
    c["seconds"] = time.perf_counter() - start
    return c


def base_inputs() -> dict:
    """The hostile-base tests (broken shards, escaping index, ONNX external data attacks), run as-is."""
    import inspect

    import test_hostile_inputs as T

    c = collections.Counter()
    for fn in (T.test_hostile_base_checkpoint, T.test_hostile_onnx_base):
        src = inspect.getsource(fn)
        n = src.count("cases.append(") + src.count('": lambda m:') + ("BASE_CONFIG_WRONG" in src) * len(
            T.BASE_CONFIG_WRONG)
        with tempfile.TemporaryDirectory(prefix="lprob-base-") as td:
            c["tried"] += n
            try:
                fn(Path(td))
            except Exception as e:  # noqa: BLE001 - any failure counts every case of the test as lost
                c["lost"] += n
                print(f"  LOST {fn.__name__}: {str(e)[:200]}", file=sys.stderr)
    return c


def interruptions(quick: bool) -> list[dict]:
    import test_atomic_interrupt as T

    root = Path(tempfile.mkdtemp(prefix="lprob-int-"))
    try:
        base, ad = T.make_big_model(root)
        conv = T.run_convert_interruptions(root, ad)
        if quick:
            return T.run_interruptions(root, base, ad) + conv
        return T.run_interruptions(root, base, ad, fresh=T.FULL, replace=T.FULL) + conv
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024


def run_part(part: str, args) -> dict:
    """In the child: one reader, one hostile class, the bases or the interruptions."""
    kind, _, name = part.partition(":")
    t0 = time.perf_counter()
    out: dict = {"part": part}
    if kind == "reader":
        seeds = H.seeds_by_format()[name]
        out["rss_before_mb"] = _rss_mb()
        out.update(fixtures=len(seeds), hostile=dict(hostile(seeds)), pickles=dict(pickles(seeds)),
                   fuzz=dict(fuzz(seeds, args.fuzz, random.Random(f"{args.seed}:{name}"))))
    elif kind == "class":
        import robustness_classes as RC

        with tempfile.TemporaryDirectory(prefix="lprob-class-") as td:
            out["rss_before_mb"] = _rss_mb()
            out["counts"] = RC.run_class(name, Path(td))
    elif kind == "bases":
        out["counts"] = dict(base_inputs())
    elif kind == "basefuzz":  # a new base layout (bench/robustness_layouts.py), mutated and merged
        import robustness_layouts as RL

        out["fuzz"] = RL.fuzz(name, args.fuzz, random.Random(f"{args.seed}:{name}"))
    else:
        out["interruptions"] = interruptions(args.quick)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def spawn(part: str, args, env: dict, timeout: float) -> dict:
    """Run one part in a child process (stdin: "y" lines, what a prompt would read; stderr passed through)."""
    cmd = [sys.executable, __file__, "--child", part, "--fuzz", str(args.fuzz), "--seed", str(args.seed)]
    cmd += ["--quick"] if args.quick else []
    try:
        r = subprocess.run(cmd, input="y\n" * 2000, stdout=subprocess.PIPE, text=True, env=env, timeout=timeout,
                           cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        print(f"  HANG part {part}: past {timeout:g} s", file=sys.stderr)
        return {"part": part, "hung": True}
    line = next((x for x in reversed(r.stdout.splitlines()) if x.startswith("@@RESULT ")), None)
    if r.returncode != 0 or line is None:
        print(f"  CRASH part {part}: exit {r.returncode}", file=sys.stderr)
        return {"part": part, "crashed": r.returncode}
    return json.loads(line[len("@@RESULT "):])


SLOW = ["reader:lycoris", "reader:kohya", "reader:diffusers", "reader:peft", "interruptions"]


def all_parts() -> list[str]:
    import robustness_classes as RC

    import robustness_layouts as RL

    return ([f"reader:{f}" for f in sorted(H.seeds_by_format())] + [f"class:{c}" for c in RC.CLASSES]
            + ["bases"] + [f"basefuzz:{k}" for k in RL.SEEDS] + ["interruptions"])


def _reader_row(r: dict) -> str:
    if "fuzz" not in r:
        return f"| {r['part'][7:]} | {'hung' if r.get('hung') else 'crashed'} | | | | | | | | | | |"
    h, p, f = r["hostile"], r["pickles"], r["fuzz"]
    return (f"| {r['part'][7:]} | {h.get('tried', 0)} | {h.get('clean error', 0)} | {h.get('valid', 0)} | "
            f"{h.get('lost', 0)} | {p.get('tried', 0)} ({p.get('payload ran', 0)}) | {f.get('iterations', 0)} "
            f"({f.get('structural mutations', 0)} / {f.get('path mutations', 0)}) | {f.get('hangs', 0)} | "
            f"{f.get('internal errors', 0)} | {f.get('lost', 0)} | {f.get('max_s', 0):.1f} | "
            f"{r['peak_rss_mb']:.0f} |")


def _class_row(r: dict) -> str:
    import robustness_classes as RC

    title = RC.CLASSES[r["part"][6:]][0]
    if "counts" not in r:
        return f"| {title} | {'hung' if r.get('hung') else 'crashed'} | | | | | | |"
    c = r["counts"]
    return (f"| {title} | {c['tried']} | {c['clean errors']} | {c['valid']} | {c['lost']} | {c['hangs']} | "
            f"{c['max_s']:.1f} | {r['peak_rss_mb']:.0f} |")


def report(results: list[dict], seconds: float, cap_note: str) -> None:
    readers = [r for r in results if r["part"].startswith("reader:")]
    classes = [r for r in results if r["part"].startswith("class:")]
    if readers:
        print("| reader | bad inputs tried | clean error | valid result | lost | planted pickles (payload ran) | "
              "fuzz iterations (structural / path) | fuzz hangs | fuzz internal errors | fuzz lost | "
              "max s / input | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in readers:
            print(_reader_row(r))
        ok = [r for r in readers if "fuzz" in r]
        tot = {k: sum(r["hostile"].get(k, 0) for r in ok) for k in ("tried", "lost")}
        ft = {k: sum(r["fuzz"].get(k, 0) for r in ok) for k in ("iterations", "hangs", "internal errors", "lost")}
        print(f"| **all readers** | **{tot['tried']}** | | | **{tot['lost']}** | "
              f"**{sum(r['pickles'].get('tried', 0) for r in ok)} "
              f"({sum(r['pickles'].get('payload ran', 0) for r in ok)})** | **{ft['iterations']}** | "
              f"**{ft['hangs']}** | **{ft['internal errors']}** | **{ft['lost']}** | | "
              f"{max((r['peak_rss_mb'] for r in ok), default=0):.0f} |")
    for r in results:
        if r["part"] == "bases" and "counts" in r:
            print(f"| base models (safetensors folders, ONNX) | {r['counts'].get('tried', 0)} | | | "
                  f"{r['counts'].get('lost', 0)} | | | | | | | {r['peak_rss_mb']:.0f} |")
    if classes:
        print("\n| hostile class (issue 14) | inputs tried | refused cleanly | valid result | lost | hangs | "
              "max s / input | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in classes:
            print(_class_row(r))
        ok = [r["counts"] for r in classes if "counts" in r]
        print(f"| **all classes** | **{sum(c['tried'] for c in ok)}** | | | **{sum(c['lost'] for c in ok)}** | "
              f"**{sum(c['hangs'] for c in ok)}** | {max((c['max_s'] for c in ok), default=0):.1f} | "
              f"{max((r['peak_rss_mb'] for r in classes if 'counts' in r), default=0):.0f} |")
    _print_basefuzz([r for r in results if r["part"].startswith("basefuzz:")])
    for r in results:
        if r["part"] == "interruptions" and "interruptions" in r:
            _print_interruptions(r["interruptions"])
    print(f"\n{seconds:.0f} s in all; {cap_note}")


def _print_basefuzz(rows: list[dict]) -> None:
    if not rows:
        return
    print("\n| fuzzed base layout (merge, inspect) | iterations (structural / path) | clean error | valid merge | "
          "hangs | internal errors | lost | max s / input | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r.get("fuzz")
        if f is None:
            print(f"| {r['part'][9:]} | {'hung' if r.get('hung') else 'crashed'} | | | | | | | |")
            continue
        cells = [f"{f.get('iterations', 0)} ({f.get('structural mutations', 0)} / {f.get('path mutations', 0)})"] + [
            str(f.get(k, 0)) for k in ("clean error", "valid", "hangs", "internal errors", "lost")]
        print(f"| {r['part'][9:]} | {' | '.join(cells)} | {f.get('max_s', 0):.1f} | {r['peak_rss_mb']:.0f} |")


def _print_interruptions(ints: list[dict]) -> None:
    lost_int = sum(not (r["ok"] and r["swept_next_run"] and r["inputs_identical"]) for r in ints)
    by = collections.Counter((r["phase"], r["signal"], r["output"]) for r in ints)
    print(f"\ninterruptions of real `loraport merge` (~57 MB base) and `loraport convert` runs: {len(ints)} points "
          f"({sum(r['result'] == 'interrupted' for r in ints)} signalled before the process exited, the rest had "
          f"already finished), {lost_int} lost")
    for (phase, sig, out), n in sorted(by.items()):
        print(f"  {phase:8s} {sig:8s} → output {out}: {n}")
    print(f"  inputs byte-identical: {all(r['inputs_identical'] for r in ints)}; temporaries swept by the next run: "
          f"{all(r['swept_next_run'] for r in ints)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz", type=int, default=2000, help="fuzz iterations per reader (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="6 interruption points instead of the 36-point matrix")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--parts", nargs="*", help="reader:<fmt>, class:<name>, bases, basefuzz:<layout>, interruptions "
                                                "(default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="parts run at once (each its own process)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("@@RESULT " + json.dumps(run_part(args.child, args)), flush=True)
        os._exit(0)  # a hung trial's abandoned thread must not keep the part alive
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lprob-cache-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LORAPORT_CACHE_DIR=str(work / "cache"), LORAPORT_KEY_FILE=str(work / "key" / "cache.key"))
    env.pop("LORAPORT_NO_GRAPH_CACHE", None)
    parts = args.parts or all_parts()

    def one(part: str) -> dict:
        t = time.perf_counter()
        r = spawn(part, args, env, timeout=3600 if part.startswith("reader:") else 1200)
        print(f"  done {part} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        return r

    from concurrent.futures import ThreadPoolExecutor

    try:  # the costliest readers first, so parallel parts finish together
        order = sorted(parts, key=lambda x: (x not in SLOW, parts.index(x)))
        with ThreadPoolExecutor(max(args.jobs, 1)) as ex:
            done = dict(zip(order, ex.map(one, order)))
        results = [done[p] for p in parts]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cap = "every bad input, fuzz iteration and class trial ran under RLIMIT_AS = the process's address space + 3 GiB"
    if args.json:
        print(json.dumps({"parts": results, "seconds": time.perf_counter() - t0, "memory_cap": cap}, indent=1))
        return
    report(results, time.perf_counter() - t0, cap)


if __name__ == "__main__":
    main()
