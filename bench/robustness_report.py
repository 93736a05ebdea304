"""Reproduce the README's robustness table ("what we tried, what happened").

    python bench/robustness_report.py                 # everything (~3-4 min on 2 cores)
    python bench/robustness_report.py --fuzz 20000    # more fuzz iterations per reader
    python bench/robustness_report.py --quick         # 5 interruption points instead of 36

For every reader in the registry (through the fixtures it accepts): the deliberate bad inputs of
tests/_hostile_util.hostile_cases (per seed, per file), planted code-executing pickles, and random mutations
(the fuzzer's mutator driven by a seeded RNG); then `loraport merge` subprocesses interrupted by SIGKILL /
SIGINT / SIGTERM at observed moments. "lost" counts anything that is not a clean one-line LoraportError or
a valid result, a required error that was accepted, a planted payload that ran, or a damaged output/input.
Peak RSS of this process is printed at the end (every bad input runs under a capped address space).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import _hostile_util as H  # noqa: E402

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
    for _ in range(n):
        ch = H.Chooser(rng=rng)
        seed = ch.pick(seeds)
        with tempfile.TemporaryDirectory(prefix="lprob-") as td:
            copy = H.copy_seed(seed, Path(td), "fuzzed")
            descs = [H.random_mutation(copy, ch) for _ in range(ch.integer(1, 3))]
            if ch.integer(0, 4) == 0:  # symlinks out, /proc, FIFOs, devices (the input-path policy)
                descs.append(H.path_mutation(copy, ch))
                c["path mutations"] += 1
            c["iterations"] += 1
            try:
                with H.memory_cap(), H.time_limit(30):
                    r = H.exercise(copy, seed)
            except Exception as e:  # noqa: BLE001
                c["lost"] += 1
                print(f"  LOST {seed.label} {descs}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            if r == "ok" and copy.is_dir() and descs[-1].endswith("secret outside"):
                c["lost"] += 1  # a symlink out of the folder was read
                print(f"  LOST {seed.label} {descs}: read through a symlink out of the folder", file=sys.stderr)
                continue
            c["valid" if r == "ok" else "clean error"] += 1
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz", type=int, default=2000, help="fuzz iterations per reader (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="6 interruption points instead of the 36-point matrix")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    rows = []
    for fmt, seeds in sorted(H.seeds_by_format().items()):
        h, p, f = hostile(seeds), pickles(seeds), fuzz(seeds, args.fuzz, rng)
        rows.append({"reader": fmt, "fixtures": len(seeds), "bad_inputs": h["tried"],
                     "bad_clean_errors": h["clean error"], "bad_valid": h["valid"], "bad_lost": h["lost"],
                     "pickles_planted": p["tried"], "pickles_refused": p["refused"],
                     "pickle_payloads_ran": p["payload ran"], "fuzz_iterations": f["iterations"],
                     "fuzz_clean_errors": f["clean error"], "fuzz_valid": f["valid"], "fuzz_lost": f["lost"],
                     "fuzz_path_mutations": f["path mutations"]})
    bases = base_inputs()
    ints = interruptions(args.quick)
    lost_int = sum(not (r["ok"] and r["swept_next_run"] and r["inputs_identical"]) for r in ints)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps({"readers": rows, "interruptions": ints, "peak_rss_mb": peak}, indent=1))
        return
    print("| reader | fixtures | bad inputs tried | clean errors | valid results | lost | planted pickles "
          "(payload ran) | fuzz iterations | fuzz lost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reader']} | {r['fixtures']} | {r['bad_inputs']} | {r['bad_clean_errors']} | {r['bad_valid']} "
              f"| {r['bad_lost']} | {r['pickles_planted']} ({r['pickle_payloads_ran']}) | {r['fuzz_iterations']} | "
              f"{r['fuzz_lost']} |")
    tot = {k: sum(r[k] for r in rows) for k in ("bad_inputs", "bad_lost", "pickles_planted", "pickle_payloads_ran",
                                                 "fuzz_iterations", "fuzz_lost")}
    print(f"| **all** | | {tot['bad_inputs']} | | | {tot['bad_lost']} | {tot['pickles_planted']} "
          f"({tot['pickle_payloads_ran']}) | {tot['fuzz_iterations']} | {tot['fuzz_lost']} |")
    print(f"| base checkpoints (safetensors folder, ONNX) | | {bases['tried']} | | | {bases['lost']} | | | |")
    by = collections.Counter((r["phase"], r["signal"], r["output"]) for r in ints)
    print(f"\ninterruptions of real `loraport merge` (~57 MB base) and `loraport convert` runs: {len(ints)} points "
          f"({sum(r['result'] == 'interrupted' for r in ints)} signalled before the process exited, the rest had "
          f"already finished), "
          f"{lost_int} lost")
    for (phase, sig, out), n in sorted(by.items()):
        print(f"  {phase:8s} {sig:8s} → output {out}: {n}")
    print(f"  inputs byte-identical: {all(r['inputs_identical'] for r in ints)}; temporaries swept by the next run: "
          f"{all(r['swept_next_run'] for r in ints)}")
    print(f"\n{time.perf_counter() - t0:.0f} s, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
