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
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, fields, replace

from sklearn.model_selection import ParameterGrid

from .config import Config
from .errors import PipelineError
from .fsutil import read_json

TYPES = ("float", "int", "categorical")
PRUNED = "pruned.json"
MAX_RETRY = 3  # retries of a trial whose worker died


def read_space(path: str) -> dict:
    """The space file, checked: known Config fields, known types, possible ranges; refused before any trial."""
    spec = read_json(path, "--space")
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


HEARTBEAT = 60  # seconds between a running trial's heartbeats (RDB storages); stale after 2 of them


@dataclass
class SearchResult:
    """What a finished search (or sweep) leaves: the study, its best trial's run directory and value, and the
    trials table."""
    study: object
    metric: str
    best_value: float | None
    best_params: dict
    best_run: str | None
    table: str


def search(cfg: Config, space_file: str, trials: int = 10, timeout: float | None = None, sampler: str = "tpe",
           pruner: str = "median", storage: str | None = None, study_name: str | None = None, jobs: int = 1,
           heartbeat: int = HEARTBEAT, worker: int = 0) -> SearchResult:
    """Run (or continue) the study until it holds `trials` finished trials, with `jobs` worker processes on this
    machine (this one and jobs - 1 more); returns the result. `worker` offsets the sampler's seed (cfg.seed): workers
    with one seed would draw the same values."""
    from .cache import open_cache
    from .precompute import precompute

    spec = read_space(space_file)
    space, base = spec["space"], spec.get("base") or {}
    name = study_name or spec.get("name") or "search"
    cfg = replace(cfg, **base)
    if "k" in space:  # every depth the space names, from one cache
        ks = sorted({int(v) for v in space["k"]["choices"]}) if space["k"]["type"] == "categorical" else \
            list(range(int(space["k"]["low"]), int(space["k"]["high"]) + 1))
        cfg = replace(cfg, depths=",".join(map(str, ks)), k=ks[0])
    path = precompute(cfg)  # a no-op when the cache is up to date
    metric, higher = cfg.best_metric(open_cache(path, cfg).label_names)
    os.makedirs(cfg.runs_dir, exist_ok=True)
    storage = storage or f"sqlite:///{os.path.abspath(os.path.join(cfg.runs_dir, name + '.db'))}"
    grid = None
    if sampler == "grid":  # every point queued once, in order (no two workers draw the same): no more trials
        grid = list(ParameterGrid({n: d["choices"] for n, d in space.items() if d["type"] == "categorical"}))
        trials = min(trials, len(grid))
    study = open_study(name, storage, higher, _sampler(sampler, space, cfg.seed + worker), _pruner(pruner),
                       heartbeat, identity={"space": space, "base": base, "metric": metric}, enqueue=grid)
    shared = {}

    def objective(trial):
        params = suggest(trial, space)
        return run_trial(trial, replace(cfg, **params, run_name=f"{name}-{trial.number:04d}"), path, metric, shared)

    command = ["search", "--space", space_file, "--trials", str(trials), "--sampler", sampler, "--pruner", pruner,
               "--storage", storage, "--study-name", name, "--heartbeat", str(heartbeat),
               *(["--timeout", str(timeout)] if timeout else [])]
    run_study(study, objective, trials, timeout, jobs, worker, cfg, command,
              os.path.join(cfg.runs_dir, f"{name}.config.json"))
    return report(study, os.path.join(cfg.runs_dir, name), metric, storage)


def open_study(name: str, storage: str, higher: bool, sampler, pruner, heartbeat: int, identity: dict,
               enqueue: list | None = None):
    """Create or load the study; one started with another space, base or metric is refused. A new study gets the
    `enqueue` points (grids) as waiting trials: each is handed to exactly one worker (the storage pops a waiting trial
    atomically), where two grid samplers drawing at once could pick the same point."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retries, plots
    backend = open_storage(storage, heartbeat)
    try:
        study = optuna.create_study(storage=backend, study_name=name, load_if_exists=True,
                                    direction="maximize" if higher else "minimize", sampler=sampler, pruner=pruner)
    except Exception as e:  # unreachable database, bad URL
        raise PipelineError(f"cannot open the study {name!r} in --storage {storage!r}: {e}") from None
    identity = json.dumps(identity, sort_keys=True)
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
        for params in enqueue or []:
            study.enqueue_trial(params)
    elif saved != identity:
        raise PipelineError(f"study {name!r} in {storage} was started with another search space, base or metric; "
                            f"choose another --study-name (or the space it was started with).")
    return study


def run_trial(trial, cfg: Config, cache_path: str, metric: str, shared: dict) -> float:
    """One trial: an ordinary run in its own directory that reports every validation to the study and stops when
    the pruner says so. A retried trial (its worker was killed, or it failed) keeps its run directory and resumes
    from its last checkpoint; a finished run there is not trained again."""
    import optuna

    from .rundir import RunDir
    from .train import train

    run = RunDir(trial.user_attrs.get("run_dir") or os.path.join(cfg.runs_dir, cfg.run_name))
    cfg = replace(cfg, runs_dir=os.path.dirname(run.path), run_name=run.name)
    trial.set_user_attr("run_dir", run.path)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    if not run.exists() and os.path.isdir(run.path):  # cut short before its config was written: nothing to keep
        shutil.rmtree(run.path)
    diff = run.config_diff(cfg) if run.exists() else []
    if diff:  # a run of an earlier study of the same name (its database removed, its runs kept)
        raise PipelineError(f"{run.path} holds a run with other settings than trial {trial.number} of study "
                            f"{trial.study.study_name!r} ({'; '.join(diff[:3])}): it was left by an earlier study of "
                            f"that name. Move it away, or choose another --study-name (nothing is overwritten).")

    def report(metrics: dict, step: int) -> None:
        trial.report(metrics[metric], step)
        if trial.should_prune():
            with open(run.file(PRUNED), "w") as fh:
                json.dump({"step": step, metric: metrics[metric]}, fh)
            raise optuna.TrialPruned(f"pruned at step {step}")

    return train(cfg, cache_path=cache_path, resume=run.exists(), shared=shared, on_evaluate=report)[metric]


def run_study(study, objective, trials: int, timeout: float | None, jobs: int, worker: int, cfg: Config,
              command: list, config_file: str) -> None:
    """Search and sweep alike: worker 0 queues the retries of failed trials, then this process and jobs - 1 more
    workers (`python -m pipeline <command>` with `cfg`) run trials until the study holds `trials`."""
    if worker == 0:
        retry_failed(study)
    with workers(jobs, cfg, command, config_file):
        run_trials(study, objective, trials, timeout)


def retry_failed(study) -> None:
    """Queue a retry of every failed trial not retried yet (Ctrl-C, an error, a worker that died), up to MAX_RETRY
    times each. Worker 0 only, before it starts the others: two workers doing this at once would queue one trial
    twice."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    retried = {n for t in study.get_trials(deepcopy=False) for n in t.system_attrs.get("retry_history", [])}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if t.number not in retried:
            retry(study, t)


def run_trials(study, objective, trials: int, timeout: float | None) -> None:
    """Run trials until the study holds `trials` finished (complete or pruned) ones, counting every worker's
    (this process, --jobs, other machines). A trial whose worker died is failed (by heartbeat on a database
    storage; on a journal file when its worker was a process of this machine) and retried."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials

    S = optuna.trial.TrialState
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    deadline = None if timeout is None else time.monotonic() + timeout
    counted = (S.COMPLETE, S.PRUNED, S.RUNNING)  # running trials count: workers finishing together start no more
    while True:
        fail_stale_trials(study)
        _fail_dead_local_workers(study, retry)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        done, running = sum(s in (S.COMPLETE, S.PRUNED) for s in states), states.count(S.RUNNING)
        left = None if deadline is None else deadline - time.monotonic()
        if done >= trials or (left is not None and left <= 0):
            return
        if done + running < trials:
            study.optimize(objective, timeout=left, catch=(),
                           callbacks=[optuna.study.MaxTrialsCallback(trials, states=counted)])
        elif not _beats(study) and not _local_workers(study):
            print(f"{running} trial(s) still running in other workers: this command stops here (a journal file "
                  f"has no heartbeat, so a trial whose worker died on another machine stays 'running'; "
                  f"see the README).", file=sys.stderr)
            return
        else:  # the last trials run in other workers: wait for them (or for their heartbeats to go stale)
            time.sleep(1.0)


def _beats(study) -> bool:
    """Whether the study's storage keeps heartbeats (database storages; a journal file does not)."""
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def _local_worker_alive(trial) -> bool | None:
    """Whether the process that runs `trial` is alive: None when it runs on another machine (or is not recorded).
    A zombie (a killed child its parent has not reaped yet) is dead."""
    import psutil

    host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _local_workers(study) -> list:
    """Running trials whose worker is a live process of this machine."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING" and _local_worker_alive(t)]


def _fail_dead_local_workers(study, retry) -> None:
    """Storages without a heartbeat (journal files): a running trial whose worker process on this machine is gone
    is failed and retried (what the heartbeat does on a database storage)."""
    import optuna

    if _beats(study):
        return
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if _local_worker_alive(t) is False:
            try:
                study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
                continue
            retry(study, study._storage.get_trial(t._trial_id))


def report(study, prefix: str, metric: str, storage: str) -> SearchResult:
    """The trials table (<prefix>.csv/.md), the plots (<prefix>_history.png, ...) and the best trial's lines."""
    import optuna

    _write_table(study, prefix, metric)
    _plots(study, prefix)
    S = optuna.trial.TrialState
    done = [t for t in study.trials if t.state == S.COMPLETE]
    counts = {s: sum(t.state == s for t in study.trials) for s in (S.PRUNED, S.FAIL, S.RUNNING)}
    extra = "".join(f", {n} {s.name.lower()}" for s, n in counts.items() if n and s != S.PRUNED)
    print(f"study {study.study_name}: {len(done)} complete, {counts[S.PRUNED]} pruned trials{extra} in {storage}")
    result = SearchResult(study, metric, None, {}, None, prefix + ".md")
    if done:
        best = study.best_trial
        result = replace(result, best_value=best.value, best_params=best.params, best_run=best.user_attrs["run_dir"])
        print(f"best trial {best.number}: {metric}={best.value:.4f} "
              + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()))
        print(f"only the best trial sees the test split: python -m pipeline evaluate --run {result.best_run}")
    return result


@contextlib.contextmanager
def workers(jobs: int, cfg: Config, command: list, config_file: str):
    """jobs - 1 more worker processes (`python -m pipeline <command> --jobs 1` with this config) on the same study
    while this process works too; each gets a share of the CPU cores (or one GPU each). Waits for them at the end;
    one that died is reported (its trial was retried by the others)."""
    if jobs == 1:
        yield
        return
    import torch

    with open(config_file, "w") as fh:
        json.dump({k: v for k, v in cfg.to_dict().items() if k != "preset"}, fh)
    gpus = torch.cuda.device_count()
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) // jobs)
    procs = []
    for j in range(1, jobs):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(j % gpus)
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", *command, "--preset", cfg.preset,
                                       "--config", config_file, "--jobs", "1", "--worker", str(j)], env=env))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if gpus:
        torch.cuda.set_device(0)
    try:
        yield
    finally:
        codes = [p.wait() for p in procs]
        torch.set_num_threads(before)
        if any(codes):
            print(f"warning: {sum(1 for c in codes if c)} of {jobs - 1} worker process(es) ended with exit codes "
                  f"{codes}; their output above says why (trials of a killed worker are retried by the others).",
                  file=sys.stderr)


def open_storage(url: str, heartbeat: int = HEARTBEAT):
    """An Optuna storage: a journal file (a path ending in .log, or journal:///path: for shared filesystems), or a
    database URL (sqlite:///…, postgresql://…, mysql://… through SQLAlchemy) with a heartbeat: a running trial
    whose worker stops beating for 2 heartbeats is failed and retried."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if url.startswith("journal:///") or url.endswith(".log"):
        path = url[len("journal://"):] if url.startswith("journal:///") else url
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks the heartbeat experimental
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                                  max_retry=MAX_RETRY))
    except Exception as e:  # unreachable server, bad URL, missing driver
        raise PipelineError(f"cannot open --storage {url!r}: {str(e).splitlines()[0]}. Check the URL and that the "
                            f"database is reachable (default: an SQLite file beside the runs).") from None


def _plots(study, prefix: str) -> None:
    """<prefix>_history.png, _importances.png, _parallel.png (optuna.visualization.matplotlib)."""
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
        fig.savefig(f"{prefix}_{kind}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def _write_table(study, prefix: str, metric: str) -> None:
    """<prefix>.csv and .md: one row per trial, linking its run directory, pruned trials marked."""
    params = sorted({k for t in study.trials for k in t.params})
    rows = []
    for t in study.trials:
        pruned_at = max(t.intermediate_values) if t.intermediate_values and t.state.name == "PRUNED" else ""
        rows.append({"trial": t.number, "state": t.state.name.lower(), metric: t.value, "pruned_at_step": pruned_at,
                     **{p: t.params.get(p) for p in params}, "run": t.user_attrs.get("run_dir", "")})
    columns = ["trial", "state", metric, "pruned_at_step", *params, "run"]
    with open(prefix + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [f"[{r['run']}]({os.path.relpath(r['run'], os.path.dirname(prefix))})" if c == "run" and r["run"] else
                 (f"{r[c]:.4f}" if c == metric else f"{r[c]:.4g}") if isinstance(r[c], float) else
                 ("" if r[c] is None else str(r[c])) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    with open(prefix + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
