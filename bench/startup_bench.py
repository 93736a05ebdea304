"""Start-up time of the command line: `loraport --help`, `loraport merge --help`, `loraport --version`, each
the median wall time of N fresh processes, next to `python -c pass` (the interpreter's own floor) in one run.

    python bench/startup_bench.py [--runs 15] [--eager]

Runs the console script when it sits next to this interpreter (else `python -m loraport`), importing this
checkout (PYTHONPATH). `--eager` adds a row that imports torch first: what every command cost before
loraport's imports became lazy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _loraport() -> list[str]:
    script = Path(sys.executable).with_name("loraport")
    if script.is_file():
        return [str(script)]
    found = shutil.which("loraport")
    return [found] if found and "shims" not in found else [sys.executable, "-m", "loraport"]


def _median_s(cmd: list[str], runs: int, env: dict) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()[-300:]}")
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--eager", action="store_true", help="also time `import torch` + --help (the old cost)")
    a = ap.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    lp = _loraport()
    rows = [("python -c pass", [sys.executable, "-c", "pass"]),
            ("loraport --help", [*lp, "--help"]),
            ("loraport merge --help", [*lp, "merge", "--help"]),
            ("loraport --version", [*lp, "--version"])]
    if a.eager:
        rows.append(("import torch; loraport --help",
                     [sys.executable, "-c", "import sys, torch; from loraport.cli import main; main(['--help'])"]))
    print(f"entry: {' '.join(lp)}   runs per row: {a.runs}   cpus: {os.cpu_count()}")
    print(f"{'command':34} {'median s':>9} {'min s':>7} {'vs python':>10}")
    floor = None
    for name, cmd in rows:
        med, best = _median_s(cmd, a.runs, env)
        floor = med if floor is None else floor
        print(f"{name:34} {med:9.3f} {best:7.3f} {'+' + format(med - floor, '.3f') + ' s':>10}")


if __name__ == "__main__":
    main()
