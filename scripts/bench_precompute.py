"""Precompute vs a plain forward of the bottom, alternated in fresh processes (the machine is noisy), and the share
of precompute's loop spent in the crash-safety fsyncs.

Usage: python scripts/bench_precompute.py [--samples 1000] [--repeats 3]
Uses bench.py's bert-base shape (random init, 10 of 12 layers frozen) and its isolated runners."""
import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def fsync_share(cfg) -> dict:
    """Run precompute once in this process with os.fsync timed."""
    import h5py

    import pipeline.precompute as P

    real, spent = os.fsync, [0.0, 0]

    def timed(fd):
        t = time.perf_counter()
        real(fd)
        spent[0] += time.perf_counter() - t
        spent[1] += 1

    P.os.fsync = timed
    try:
        path = P.precompute(cfg, force=True)
    finally:
        P.os.fsync = real
    with h5py.File(path) as f:
        loop = json.loads(f.attrs["stats_json"])["loop_seconds"]
    return {"fsync_s": spent[0], "fsyncs": spent[1], "loop_s": loop, "share": spent[0] / loop}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from pipeline import make_config
    from pipeline.cli import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as wd:
        cfg = make_config("default", model=bench.make_bert_base(wd), k=10, cache_dir=os.path.join(wd, "cache"),
                          max_examples=math.ceil(args.samples / 0.8))
        ratios = []
        for i in range(args.repeats):
            f = bench.run_isolated("bottom_forward", cfg)
            p = bench.run_isolated("ours_precompute", cfg)
            ratios.append(f["forward_s"] / p["loop_s"])
            print(f"rep {i}: plain forward {f['forward_s']:.1f} s, precompute loop {p['loop_s']:.1f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        print(f"precompute_vs_plain_forward best of {args.repeats}: {max(ratios):.3f}")
        s = fsync_share(make_config("default", max_examples=3000, cache_dir=os.path.join(wd, "cache")))
        print(f"fsync: {s['fsync_s']:.3f} s in {s['fsyncs']} commits of a {s['loop_s']:.2f} s precompute loop "
              f"(MiniLM, 3,000 examples): {s['share']:.1%}")


if __name__ == "__main__":
    main()
