"""A grid of trainings from one cache on the search engine (pipeline/search.py: Optuna's grid sampler, no pruner);
a results table and a plot.

A grid file is JSON: {"name": "...", "base": {<config fields fixed for the sweep>},
                      "grids": [{<config field>: [values, ...], ...}, ...]}
Each entry of "grids" is a product of its lists (sklearn's ParameterGrid); the sweep runs the union, one trial per
point. Runs go to <runs_dir>/<name>/<point>, the study to <runs_dir>/<name>/study.db: rerunning continues it (a
finished point is not run again, one cut short resumes from its checkpoint)."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import fields

from sklearn.model_selection import ParameterGrid

from .cache import open_cache
from .config import Config
from .errors import PipelineError
from .fsutil import read_json
from .precompute import precompute
from .rundir import RunDir
from .search import HEARTBEAT, open_study, report, run_study, run_trial


def load_grid(path: str) -> dict:
    spec = read_json(path, "the sweep grid")
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


def sweep(base: Config, grid_file: str, jobs: int = 1, storage: str | None = None, heartbeat: int = HEARTBEAT,
          worker: int = 0) -> str:
    """Every grid point's run, on the search engine: an Optuna study whose grid sampler hands each point to one
    trial (no pruner), with `jobs` worker processes; then the results table and plot. Rerunning continues it."""
    import optuna

    spec = load_grid(grid_file)
    points = {slug(p): p for p in grid_points(spec["grids"])}
    cfgs = {s: Config.from_dict({**base.to_dict(), **spec["base"], **p, "run_name": f"{spec['name']}/{s}"})
            for s, p in points.items()}
    for c in {c.cache_path(): c for c in cfgs.values()}.values():  # one precompute per distinct cache (no-op if there)
        precompute(c)
    infos = {s: open_cache(c.cache_path(), c) for s, c in cfgs.items()}
    first = next(iter(cfgs))
    metric, higher = cfgs[first].best_metric(infos[first].label_names)  # the grid file's base may set it
    out_dir = os.path.join(base.runs_dir, spec["name"])
    os.makedirs(out_dir, exist_ok=True)
    storage = storage or f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'study.db'))}"
    study = open_study(spec["name"], storage, higher, optuna.samplers.GridSampler({"point": list(points)}, seed=0),
                       optuna.pruners.NopPruner(), heartbeat,
                       identity={"points": list(points), "base": spec["base"], "metric": metric},
                       enqueue=[{"point": s} for s in points])  # in grid order, each to one worker
    finished = sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials)
    print(f"sweep {spec['name']}: {len(points)} runs from {len({i.path for i in infos.values()})} cache(s), "
          f"{jobs} worker process(es), {finished} finished earlier -> {out_dir}")
    shared = {}  # each cached split reader is opened once for all runs of a process

    def objective(trial):
        point = trial.suggest_categorical("point", list(points))
        print(f"[trial {trial.number + 1}] {point}: training", flush=True)
        return run_trial(trial, cfgs[point], cfgs[point].cache_path(), metric, shared)

    command = ["sweep", "--grid", grid_file, "--storage", storage, "--heartbeat", str(heartbeat)]
    run_study(study, objective, len(points), None, jobs, worker, base, command,
              os.path.join(out_dir, "sweep_config.json"))
    report(study, os.path.join(out_dir, "trials"), metric, storage)
    grid_keys = [k for k in dict.fromkeys(k for p in points.values() for k in p) if k != "k"]
    rows = [_row(cfgs[s], infos[s], out_dir, grid_keys) for s in points]
    write_results(rows, out_dir, cfgs[first], infos[first].label_names)
    return out_dir


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
