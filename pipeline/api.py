"""The Python API (notebooks, scripts): the command line's steps as functions that return small result objects.

    from pipeline import Config, make_config, precompute, train, evaluate, search, predict

    cfg = make_config("default", epochs=2)            # a preset plus options, or Config(...)
    cache = precompute(cfg)                           # Precomputed: path, depths, splits, labels
    run = train(cfg, lr=1e-4, run_name="lr1e-4")      # Trained: run_dir, metrics (best validation), best_step
    result = search(cfg, "sweeps/search-default.json", trials=8)   # SearchResult: study, best_run, ...
    scores = evaluate(result.best_run)                # Evaluation: metrics, ci95 (test split)
    predict(run.run_dir, ["a gripping film"]).results

Each function takes a Config and keyword overrides of its fields (`train(cfg, lr=1e-4)`), prints what the command
prints, shows tqdm.auto progress bars (widgets in a notebook), and raises PipelineError with the same message the
command would print after `error:`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .cache import open_cache
from .config import Config, make_config
from .evaluate import evaluate_run
from .export import predict as _predict
from .precompute import precompute as _precompute
from .rundir import RunDir
from .search import HEARTBEAT, SearchResult
from .search import search as _search
from .train import train as _train


@dataclass
class Precomputed:
    path: str
    """the HDF5 cache file"""
    depths: list
    """the depths whose hidden states it holds"""
    splits: dict
    """split name -> examples"""
    label_names: list | None
    """class or tag names (None for regression)"""


@dataclass
class Trained:
    run_dir: str
    """the run directory: config, metrics.jsonl, checkpoints, best top weights, results.json"""
    metrics: dict
    """the best validation evaluation's metrics (the run's result)"""
    best_step: int
    """the optimizer step of that evaluation"""


@dataclass
class Evaluation:
    run_dir: str
    split: str | None
    """the cached split scored, or None for a file"""
    dataset: str | None
    """the labeled file scored, or None for a cached split"""
    examples: int
    metrics: dict
    ci95: dict
    """metric -> (low, high) bootstrap 95% interval"""


@dataclass
class Predictions:
    task: str
    results: list
    """one per text: (label, probability); a list of labels (multi-label); (word, tag, probability) per word"""


def _config(cfg: Config | None, overrides: dict) -> Config:
    return replace(cfg if cfg is not None else make_config("default"), **overrides)


def precompute(cfg: Config | None = None, force: bool = False, **overrides) -> Precomputed:
    """Run the frozen bottom once over the dataset and write (or find up to date) the cache."""
    cfg = _config(cfg, overrides)
    info = open_cache(_precompute(cfg, force=force), cfg)
    return Precomputed(info.path, list(info.depths), dict(info.splits), info.label_names)


def train(cfg: Config | None = None, resume: bool = False, **overrides) -> Trained:
    """Train the top from the cache (precompute first); `resume=True` continues cfg.run_name from its checkpoint."""
    run_dir = _train(_config(cfg, overrides), resume=resume)["run_dir"]
    results = RunDir(run_dir).results()
    return Trained(run_dir, results["metrics"], results["best"]["step"])


def evaluate(run_dir: str, split: str = "test", dataset: str | None = None, resamples: int = 1000,
             save_predictions: bool = False, **data_options) -> Evaluation:
    """Score a finished run on a cached split (test by default: only for the run you picked) or a labeled file
    (`dataset=`, with column options such as label_column= when they differ from the run's)."""
    r = evaluate_run(run_dir, split, dataset, data_options, resamples, None, save_predictions)
    return Evaluation(run_dir, r["split"], r["dataset"], r["examples"], r["metrics"], r["ci95"])


def search(cfg: Config | None = None, space: str = "sweeps/search-default.json", trials: int = 10,
           timeout: float | None = None, sampler: str = "tpe", pruner: str = "median", storage: str | None = None,
           study_name: str | None = None, jobs: int = 1, heartbeat: int = HEARTBEAT, **overrides) -> SearchResult:
    """Run or continue an Optuna study over the space file (see `python -m pipeline search --help`)."""
    return _search(_config(cfg, overrides), space, trials, timeout, sampler, pruner, storage, study_name, jobs,
                   heartbeat)


def predict(model_dir: str, texts: list, pairs: list | None = None, batch_size: int = 32) -> Predictions:
    """Label raw texts with a run directory or an exported folder."""
    task, results = _predict(model_dir, list(texts), pairs, batch_size)
    return Predictions(task.name, results)
