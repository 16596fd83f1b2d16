"""Wall time of one sweep grid run with --jobs 1 and with --jobs N, side by side, from the same existing cache.

Usage: python scripts/bench_sweep.py [--grid sweeps/default.json] [--jobs 2] [--work cache/bench-sweep]
The cache is built first (not timed); each setting then trains every grid point into its own fresh runs folder.
Prints the two wall times, their ratio, and the largest difference of each validation metric between the two
(threads per process differ, so float32 sums may differ in the last bits)."""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(grid: str, jobs: int, runs_dir: str, *extra: str) -> float:
    shutil.rmtree(runs_dir, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "sweep", "--grid", grid, "--jobs", str(jobs),
                    "--runs-dir", runs_dir, *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def rows(runs_dir: str) -> dict:
    (name,) = os.listdir(runs_dir)
    with open(os.path.join(runs_dir, name, "results.csv")) as fh:
        return {r["run"]: {k: v for k, v in r.items() if k.startswith("val_")} for r in csv.DictReader(fh)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="sweeps/default.json")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default="cache/bench-sweep")
    args = ap.parse_args()
    args.work = os.path.join(ROOT, args.work)  # relative paths: from the project root, like the sweeps' cwd
    sweep_grid = os.path.join(ROOT, args.grid)
    # the cache is built (or found) untimed by a one-step sweep whose runs are thrown away
    sweep(sweep_grid, 1, os.path.join(args.work, "warm-up"), "--max-steps", "1")
    one = sweep(sweep_grid, 1, os.path.join(args.work, "jobs1"))
    many = sweep(sweep_grid, args.jobs, os.path.join(args.work, f"jobs{args.jobs}"))
    a, b = rows(os.path.join(args.work, "jobs1")), rows(os.path.join(args.work, f"jobs{args.jobs}"))
    diff = {m: max(abs(float(a[r][m]) - float(b[r][m])) for r in a) for m in next(iter(a.values()))}
    print(f"grid {args.grid}: --jobs 1 {one:.1f} s, --jobs {args.jobs} {many:.1f} s, ratio {one / many:.2f}x; "
          f"largest difference of a validation metric between the two: "
          + ", ".join(f"{m} {d:.2g}" for m, d in diff.items()))


if __name__ == "__main__":
    main()
