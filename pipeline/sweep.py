"""Run a grid of trainings from one cache, one after another, resumably; write a results table and a plot.

A grid file is JSON: {"name": "...", "base": {<config fields fixed for the sweep>},
                      "grids": [{<config field>: [values, ...], ...}, ...]}
Each entry of "grids" is a product of its lists; the sweep runs the union. Runs go to <runs_dir>/<name>/<point>;
a finished run (results.json) is skipped, an interrupted one resumes from its checkpoint."""
from __future__ import annotations

import csv
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

from sklearn.model_selection import ParameterGrid

from .cache import open_cache
from .config import Config
from .errors import PipelineError
from .precompute import precompute
from .rundir import RunDir
from .train import train


def load_grid(path: str) -> dict:
    try:
        with open(path) as fh:
            spec = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"cannot read the sweep grid {path!r}: {e}") from None
    known = {f.name for f in fields(Config)}
    grids = spec.get("grids") or ([spec["grid"]] if "grid" in spec else [])
    if not grids:
        raise PipelineError(f"sweep grid {path!r} has no \"grids\" (a list of {{field: [values]}}).")
    for g in [spec.get("base", {}), *grids]:
        unknown = sorted(set(g) - known)
        if unknown:
            raise PipelineError(f"sweep grid {path!r}: unknown config fields {unknown}.")
    for g in grids:
        bad = [k for k, v in g.items() if not isinstance(v, list) or not v]
        if bad:
            raise PipelineError(f"sweep grid {path!r}: {bad} must be non-empty lists of values.")
    return {"name": spec.get("name") or os.path.splitext(os.path.basename(path))[0], "base": spec.get("base", {}),
            "grids": grids}


def grid_points(grids: list) -> list:
    """The union of the grids' products (sklearn's ParameterGrid), each point once, in grid order."""
    points = {json.dumps(p, sort_keys=True): p for p in ParameterGrid(grids)}
    return list(points.values())


def slug(point: dict) -> str:
    return "_".join(f"{k}={str(v).replace(',', '-').replace('/', '-')}" for k, v in sorted(point.items()))


def strategy(cfg: Config, num_layers: int) -> str:
    if cfg.stages:
        return f"gradual {cfg.stages}"
    blocks = num_layers - cfg.k
    return "head only" if blocks == 0 else f"top {blocks} block{'s' * (blocks > 1)}"


def sweep(base: Config, grid_file: str, jobs: int = 1) -> str:
    """Every grid point's run, `jobs` at a time (separate processes when jobs > 1), then the results table."""
    spec = load_grid(grid_file)
    points = grid_points(spec["grids"])
    cfgs = [Config.from_dict({**base.to_dict(), **spec["base"], **p, "run_name": f"{spec['name']}/{slug(p)}"})
            for p in points]
    for c in {c.cache_path(): c for c in cfgs}.values():  # one precompute per distinct cache (no-op if there)
        precompute(c)
    infos = [open_cache(c.cache_path(), c) for c in cfgs]
    out_dir = os.path.join(base.runs_dir, spec["name"])
    print(f"sweep {spec['name']}: {len(points)} runs from {len({i.path for i in infos})} cache(s), {jobs} at a time "
          f"-> {out_dir}")
    todo = []
    for n, (p, cfg) in enumerate(zip(points, cfgs), 1):
        run = RunDir(os.path.join(cfg.runs_dir, cfg.run_name))
        if run.finished():
            print(f"[{n}/{len(points)}] {slug(p)}: finished earlier, skipped")
            continue
        resume = run.latest_checkpoint() is not None
        if not resume and os.path.exists(run.path):  # interrupted before its first checkpoint: nothing to keep
            shutil.rmtree(run.path)
        todo.append((f"[{n}/{len(points)}] {slug(p)}: {'resuming' if resume else 'training'}", cfg, resume))
    if jobs == 1:
        shared = {}  # each cached split reader is opened once for all runs
        for what, cfg, resume in todo:
            print(what)
            train(cfg, resume=resume, shared=shared)
    else:
        _run_parallel(todo, jobs)
    grid_keys = [k for k in dict.fromkeys(k for p in points for k in p) if k != "k"]
    rows = [_row(cfg, info, out_dir, grid_keys) for cfg, info in zip(cfgs, infos)]
    write_results(rows, out_dir, cfgs[0], infos[0].label_names)  # the grid file's base may set --metric-for-best
    return out_dir


def _run_parallel(todo: list, jobs: int) -> None:
    """Each run in its own `python -m pipeline train` process, `jobs` at once: one GPU each where there are GPUs,
    else the CPU cores split between them. A failed run does not stop the others; its log names the problem."""
    import torch

    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    slots = queue.Queue()
    for i in range(jobs):
        slots.put(i)
    failed = []

    def one(item):
        what, cfg, resume = item
        run = RunDir(os.path.join(cfg.runs_dir, cfg.run_name))
        os.makedirs(run.path, exist_ok=True)
        with open(run.file("sweep_config.json"), "w") as fh:
            json.dump({k: v for k, v in cfg.to_dict().items() if k != "preset"}, fh)
        slot = slots.get()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        print(f"{what} (job {slot + 1}{f', GPU {slot % gpus}' if gpus else f', {threads} CPU thread(s)'}); "
              f"log: {run.file('train.log')}", flush=True)
        t0 = time.time()
        try:
            with open(run.file("train.log"), "a") as log:
                rc = subprocess.call([sys.executable, "-m", "pipeline", "train", "--preset", cfg.preset, "--config",
                                      run.file("sweep_config.json"), *(["--resume"] if resume else [])],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            slots.put(slot)
        print(f"{what.split(':')[0]}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f} s",
              flush=True)
        if rc:
            failed.append(run.file("train.log"))

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))
    if failed:
        raise PipelineError(f"{len(failed)} sweep run(s) failed; see their logs: {', '.join(failed)}. Rerun the "
                            f"sweep to retry them (finished runs are skipped).")


def _row(cfg: Config, info, out_dir: str, grid_keys: list) -> dict:
    run = RunDir(os.path.join(cfg.runs_dir, cfg.run_name))
    res = run.results()
    best = res["best"]
    return {"run": os.path.relpath(run.path, out_dir), "strategy": strategy(cfg, info.num_layers),
            "trainable_blocks": info.num_layers - cfg.stage_depths()[-1], **{k: getattr(cfg, k) for k in grid_keys},
            **{f"val_{k}": v for k, v in res["metrics"].items()}, "best_step": best["step"], "steps": res["step"],
            f"last_{best['metric']}": res["last_metrics"][best["metric"]],
            "seconds": round(res["train_seconds"], 1), "trainable_params": res["trainable_params"]}


def pick_best(rows: list, cfg: Config, label_names: list | None = None) -> int:
    """Index of the row with the best validation --metric-for-best (validation only: test never picks); the label
    names resolve `auto` as each run did (entity F1 for tags in an entity scheme)."""
    name, higher = cfg.best_metric(label_names)
    values = [r[f"val_{name}"] for r in rows]
    ok = [i for i, v in enumerate(values) if v == v]  # not NaN
    return max(ok, key=lambda i: values[i] if higher else -values[i]) if ok else 0


def write_results(rows: list, out_dir: str, cfg: Config, label_names: list | None = None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    best = pick_best(rows, cfg, label_names)
    for i, r in enumerate(rows):
        r["pick"] = "best" if i == best else ""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)

    def fmt(column, v):
        if column.startswith(("val_", "last_")):
            return f"{v:.4f}"
        return "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [f"[{r['run']}]({r['run']})" if c == "run" else fmt(c, r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    name = cfg.best_metric(label_names)[0]
    chosen = os.path.join(out_dir, rows[best]["run"])
    note = (f"best by validation {name}: {rows[best]['run']} ({rows[best][f'val_{name}']:.4f}). Only that run "
            f"should see the test split: python -m pipeline evaluate --run {chosen} --split test")
    with open(os.path.join(out_dir, "results.md"), "a") as fh:
        fh.write("\n" + note + "\n")
    plot(rows, os.path.join(out_dir, "results.png"))
    print(f"sweep results: {out_dir}/results.csv, results.md, results.png")
    print("\n".join(lines))
    print(note)


def plot(rows: list, path: str) -> None:
    """Final validation metric vs trainable blocks, one line per (strategy kind, lr, other settings), mean and
    standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = "val_accuracy" if rows and "val_accuracy" in rows[0] else "val_pearson"
    skip = {"run", "strategy", "trainable_blocks", "seed", "seconds", "trainable_params", "stages", "best_step",
            "steps", "pick"}
    varying = [k for k in (rows[0] if rows else {}) if k not in skip and not k.startswith(("val_", "last_"))
               and len({str(r.get(k)) for r in rows}) > 1]
    series = {}
    for r in rows:
        kind = "gradual unfreezing" if r["strategy"].startswith("gradual") else "fixed depth"
        others = ", ".join(f"{k}={r[k]:g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in varying)
        series.setdefault(f"{kind}{', ' + others if others else ''}", {}).setdefault(
            r["trainable_blocks"], []).append(r[metric])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, by_x in sorted(series.items()):
        xs = sorted(by_x)
        means = [float(np.mean(by_x[x])) for x in xs]
        stds = [float(np.std(by_x[x])) for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=label)
    ax.set_xticks(sorted({x for by_x in series.values() for x in by_x}))
    ax.set_xlabel("trainable encoder blocks (0 = head only)")
    ax.set_ylabel(metric[4:] + " (validation, best evaluation)")
    ax.set_title("sweep: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
