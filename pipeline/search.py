"""Hyperparameter search on Optuna from one multi-depth cache.

A space file (JSON) names Config fields and their distributions:
    {"name": "demo", "base": {"epochs": 1, "eval_every": 10},
     "space": {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": true},
               "k": {"type": "categorical", "choices": [4, 5, 6]},
               "seed": {"type": "int", "low": 1, "high": 3}}}
`base` fixes options for every trial. The cache holds every depth the space names (precomputed once; a no-op when
present). Each trial is an ordinary run (its own run directory) that reports the task's --metric-for-best at every
evaluation to the study and stops when the pruner says so (its directory then holds pruned.json). The study lives
in an SQLite file beside the runs unless --storage names another database; rerunning the same command continues
it up to --trials trials in all.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from dataclasses import fields, replace

from .config import Config
from .errors import PipelineError

TYPES = ("float", "int", "categorical")
PRUNED = "pruned.json"


def read_space(path: str) -> dict:
    """The space file, checked: known Config fields, known types, possible ranges; refused before any trial."""
    try:
        with open(path) as fh:
            spec = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"cannot read --space {path!r}: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("space"), dict) or not spec["space"]:
        raise PipelineError(f"--space {path!r} needs a non-empty \"space\" object mapping Config fields to "
                            f"distributions (see `python -m pipeline search --help`).")
    known = {f.name for f in fields(Config)} - {"preset", "run_name", "runs_dir", "depths"}
    problems = []
    for name, dist in spec["space"].items():
        if name not in known:
            problems.append(f"{name!r} is not a Config field (fields: lr, k, epochs, batch_size, warmup_ratio, "
                            f"weight_decay, seed, ...)")
            continue
        kind = dist.get("type") if isinstance(dist, dict) else None
        if kind not in TYPES:
            problems.append(f"{name}: type must be one of {', '.join(TYPES)}, got {kind!r}")
        elif kind == "categorical":
            if not isinstance(dist.get("choices"), list) or not dist["choices"]:
                problems.append(f"{name}: a categorical needs a non-empty list \"choices\"")
        else:
            low, high = dist.get("low"), dist.get("high")
            if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high:
                problems.append(f"{name}: {kind} needs numbers low < high, got low={low!r} high={high!r}")
            elif dist.get("log") and low <= 0:
                problems.append(f"{name}: a log scale needs low > 0, got {low!r}")
    for name in spec.get("base", {}) or {}:
        if name not in known:
            problems.append(f"base: {name!r} is not a Config field")
    if problems:
        raise PipelineError(f"--space {path!r} is not a valid search space:\n  " + "\n  ".join(problems))
    return spec


def suggest(trial, space: dict) -> dict:
    """One trial's values from the study (Optuna's suggest_* per distribution)."""
    out = {}
    for name, d in space.items():
        if d["type"] == "categorical":
            out[name] = trial.suggest_categorical(name, d["choices"])
        elif d["type"] == "int":
            out[name] = trial.suggest_int(name, int(d["low"]), int(d["high"]), log=bool(d.get("log")))
        else:
            out[name] = trial.suggest_float(name, float(d["low"]), float(d["high"]), log=bool(d.get("log")))
    return out


def _sampler(kind: str, space: dict, seed: int):
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {n: d["choices"] for n, d in space.items() if d["type"] == "categorical"}
    if len(grid) != len(space):
        raise PipelineError("--sampler grid needs every field of the space to be categorical (a list of choices).")
    return optuna.samplers.GridSampler(grid, seed=seed)


def _pruner(kind: str):
    import optuna

    return {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
            "none": optuna.pruners.NopPruner}[kind]()


def search(cfg: Config, space_file: str, trials: int = 10, timeout: float | None = None, sampler: str = "tpe",
           pruner: str = "median", storage: str | None = None, study_name: str | None = None):
    """Run (or continue) the study up to `trials` finished trials; returns it."""
    import optuna

    from .cache import open_cache
    from .precompute import precompute
    from .train import train

    spec = read_space(space_file)
    space, base = spec["space"], spec.get("base") or {}
    name = study_name or spec.get("name") or "search"
    cfg = replace(cfg, **base)
    if "k" in space:  # every depth the space names, from one cache
        ks = sorted({int(v) for v in space["k"]["choices"]}) if space["k"]["type"] == "categorical" else \
            list(range(int(space["k"]["low"]), int(space["k"]["high"]) + 1))
        cfg = replace(cfg, depths=",".join(map(str, ks)), k=ks[0])
    path = precompute(cfg)  # a no-op when the cache is up to date
    info = open_cache(path, cfg)
    metric, higher = cfg.best_metric(info.label_names)
    os.makedirs(cfg.runs_dir, exist_ok=True)
    storage = storage or f"sqlite:///{os.path.abspath(os.path.join(cfg.runs_dir, name + '.db'))}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = open_storage(storage)
    identity = json.dumps({"space": space, "base": base, "metric": metric}, sort_keys=True)
    try:
        study = optuna.create_study(storage=backend, study_name=name, load_if_exists=True,
                                    direction="maximize" if higher else "minimize",
                                    sampler=_sampler(sampler, space, cfg.seed), pruner=_pruner(pruner))
    except Exception as e:  # unreachable database, bad URL
        raise PipelineError(f"cannot open the study {name!r} in --storage {storage!r}: {e}") from None
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
    elif saved != identity:
        raise PipelineError(f"study {name!r} in {storage} was started with another search space, base or metric; "
                            f"choose another --study-name (or the space it was started with).")

    def objective(trial):
        params = suggest(trial, space)
        run_name = f"{name}-{trial.number:04d}"
        trial.set_user_attr("run_dir", os.path.join(cfg.runs_dir, run_name))
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        tcfg = replace(cfg, **params, run_name=run_name)

        def report(metrics: dict, step: int) -> None:
            trial.report(metrics[metric], step)
            if trial.should_prune():
                with open(os.path.join(cfg.runs_dir, run_name, PRUNED), "w") as fh:
                    json.dump({"step": step, metric: metrics[metric]}, fh)
                raise optuna.TrialPruned(f"pruned at step {step}")

        result = train(tcfg, cache_path=path, on_evaluate=report)
        return result[metric]

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if len(study.get_trials(deepcopy=False, states=finished)) < trials:
        # every worker on this study (this process, --jobs, other machines) stops once it holds `trials` in all
        # (running trials count too, so that workers finishing together do not start more than asked)
        study.optimize(objective, timeout=timeout, catch=(), callbacks=[optuna.study.MaxTrialsCallback(
            trials, states=(*finished, optuna.trial.TrialState.RUNNING))])
    _write_table(study, cfg.runs_dir, name, metric)
    _plots(study, cfg.runs_dir, name)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    print(f"study {name}: {len(done)} complete, {pruned} pruned trials in {storage}")
    if done:
        best = study.best_trial
        print(f"best trial {best.number}: {metric}={best.value:.4f} "
              + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()))
        print(f"only the best trial sees the test split: python -m pipeline evaluate --run "
              f"{best.user_attrs['run_dir']}")
    return study


@contextlib.contextmanager
def workers(jobs: int, argv: list):
    """jobs - 1 more worker processes running this same search command (with --jobs 1) against the same study while
    this process works too; each gets a share of the CPU cores (or one GPU each). Waits for them at the end."""
    if jobs == 1:
        yield
        return
    import torch

    args, skip = [], False  # the same command with --jobs 1 (given as "--jobs N" or "--jobs=N")
    for a in argv:
        if not skip and not a.startswith("--jobs"):
            args.append(a)
        skip = a == "--jobs"
    args += ["--jobs", "1"]
    gpus = torch.cuda.device_count()
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) // jobs)
    procs = []
    for j in range(1, jobs):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(j % gpus)
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env))
    torch.set_num_threads(threads)
    if gpus:
        torch.cuda.set_device(0)
    try:
        yield
    finally:
        codes = [p.wait() for p in procs]
        if any(codes):
            raise PipelineError(f"{sum(1 for c in codes if c)} of {jobs - 1} search worker process(es) failed "
                                f"(exit codes {codes}); rerun the command to continue the study.")


def open_storage(url: str):
    """An Optuna storage: a journal file (a path ending in .log, or journal:///path: for shared filesystems), or a
    database URL (sqlite:///…, postgresql://…, mysql://… through SQLAlchemy)."""
    import optuna

    if url.startswith("journal:///") or url.endswith(".log"):
        path = url[len("journal://"):] if url.startswith("journal:///") else url
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as e:  # unreachable server, bad URL, missing driver
        raise PipelineError(f"cannot open --storage {url!r}: {str(e).splitlines()[0]}. Check the URL and that the "
                            f"database is reachable (default: an SQLite file beside the runs).") from None


def _plots(study, runs_dir: str, name: str) -> None:
    """<runs>/<study>_history.png, _importances.png, _parallel.png (optuna.visualization.matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    plots = {"history": vis.plot_optimization_history}
    if len(done) >= 2 and len({k for t in done for k in t.params}) >= 1:
        plots["parallel"] = vis.plot_parallel_coordinate
    if len(done) >= 2 and len(study.trials[0].params) >= 2:
        plots["importances"] = vis.plot_param_importances
    import warnings

    for kind, fn in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks matplotlib plots experimental
            try:
                ax = fn(study)
            except (ValueError, RuntimeError):  # e.g. importances of parameters that never varied
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.savefig(os.path.join(runs_dir, f"{name}_{kind}.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)


def _write_table(study, runs_dir: str, name: str, metric: str) -> None:
    """<runs>/<study>.csv and .md: one row per trial, linking its run directory, pruned trials marked."""
    params = sorted({k for t in study.trials for k in t.params})
    rows = []
    for t in study.trials:
        pruned_at = max(t.intermediate_values) if t.intermediate_values and t.state.name == "PRUNED" else ""
        rows.append({"trial": t.number, "state": t.state.name.lower(), metric: t.value, "pruned_at_step": pruned_at,
                     **{p: t.params.get(p) for p in params}, "run": t.user_attrs.get("run_dir", "")})
    columns = ["trial", "state", metric, "pruned_at_step", *params, "run"]
    with open(os.path.join(runs_dir, f"{name}.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [f"[{r['run']}]({os.path.relpath(r['run'], runs_dir)})" if c == "run" and r["run"] else
                 (f"{r[c]:.4f}" if c == metric else f"{r[c]:.4g}") if isinstance(r[c], float) else
                 ("" if r[c] is None else str(r[c])) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(runs_dir, f"{name}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
