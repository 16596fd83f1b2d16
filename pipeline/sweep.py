"""Run a grid of trainings from one cache, one after another, resumably; write a results table and a plot.

A grid file is JSON: {"name": "...", "base": {<config fields fixed for the sweep>},
                      "grids": [{<config field>: [values, ...], ...}, ...]}
Each entry of "grids" is a product of its lists; the sweep runs the union. Runs go to <runs_dir>/<name>/<point>;
a finished run (results.json) is skipped, an interrupted one resumes from its checkpoint."""
from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
from dataclasses import fields

from .cache import open_cache
from .config import Config
from .errors import PipelineError
from .precompute import precompute
from .train import latest_checkpoint, train


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
    points, seen = [], set()
    for g in grids:
        for values in itertools.product(*g.values()):
            p = dict(zip(g.keys(), values))
            key = json.dumps(p, sort_keys=True)
            if key not in seen:
                seen.add(key)
                points.append(p)
    return points


def slug(point: dict) -> str:
    return "_".join(f"{k}={str(v).replace(',', '-').replace('/', '-')}" for k, v in sorted(point.items()))


def strategy(cfg: Config, num_layers: int) -> str:
    if cfg.stages:
        return f"gradual {cfg.stages}"
    blocks = num_layers - cfg.k
    return "head only" if blocks == 0 else f"top {blocks} block{'s' * (blocks > 1)}"


def sweep(base: Config, grid_file: str) -> str:
    spec = load_grid(grid_file)
    points = grid_points(spec["grids"])
    cfgs = [Config.from_dict({**base.to_dict(), **spec["base"], **p, "run_name": f"{spec['name']}/{slug(p)}"})
            for p in points]
    for c in {c.cache_path(): c for c in cfgs}.values():  # one precompute per distinct cache (no-op if there)
        precompute(c)
    infos = [open_cache(c.cache_path(), c) for c in cfgs]
    out_dir = os.path.join(base.runs_dir, spec["name"])
    print(f"sweep {spec['name']}: {len(points)} runs from {len({i.path for i in infos})} cache(s) -> {out_dir}")
    shared, rows = {}, []  # shared: each cached split is loaded once for all runs
    grid_keys = [k for k in dict.fromkeys(k for p in points for k in p) if k != "k"]
    for n, (p, cfg, info) in enumerate(zip(points, cfgs, infos), 1):
        run_dir = os.path.join(cfg.runs_dir, cfg.run_name)
        if os.path.exists(os.path.join(run_dir, "results.json")):
            print(f"[{n}/{len(points)}] {slug(p)}: finished earlier, skipped")
        else:
            resume = latest_checkpoint(run_dir) is not None
            if not resume and os.path.exists(run_dir):  # interrupted before its first checkpoint: nothing to keep
                shutil.rmtree(run_dir)
            print(f"[{n}/{len(points)}] {slug(p)}: {'resuming' if resume else 'training'}")
            train(cfg, resume=resume, shared=shared)
        rows.append(_row(cfg, info, run_dir, out_dir, grid_keys))
    write_results(rows, out_dir)
    return out_dir


def _row(cfg: Config, info, run_dir: str, out_dir: str, grid_keys: list) -> dict:
    with open(os.path.join(run_dir, "results.json")) as fh:
        res = json.load(fh)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    primary = "val_accuracy" if cfg.task == "classification" else "val_pearson"
    return {"run": os.path.relpath(run_dir, out_dir), "strategy": strategy(cfg, info.num_layers),
            "trainable_blocks": info.num_layers - res["k"], **{k: getattr(cfg, k) for k in grid_keys},
            f"best_{primary[4:]}": max(r[primary] for r in records),
            **{f"final_{k}": v for k, v in res["metrics"].items()},
            "seconds": round(res["train_seconds"], 1), "trainable_params": res["trainable_params"]}


def write_results(rows: list, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)

    def fmt(column, v):
        if column.startswith(("best_", "final_")):
            return f"{v:.4f}"
        return "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [f"[{r['run']}]({r['run']})" if c == "run" else fmt(c, r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(out_dir, "results.png"))
    print(f"sweep results: {out_dir}/results.csv, results.md, results.png")
    print("\n".join(lines))


def plot(rows: list, path: str) -> None:
    """Final validation metric vs trainable blocks, one line per (strategy kind, lr, other settings), mean and
    standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = "final_accuracy" if rows and "final_accuracy" in rows[0] else "final_pearson"
    skip = {"run", "strategy", "trainable_blocks", "seed", "seconds", "trainable_params", "stages"}
    varying = [k for k in (rows[0] if rows else {}) if k not in skip and not k.startswith(("best_", "final_"))
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
    ax.set_ylabel(metric.replace("_", " ") + " (validation)")
    ax.set_title("sweep: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
