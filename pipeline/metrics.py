"""Validation/test metrics (sklearn, scipy) and their bootstrap confidence intervals."""
from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap, pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error


def _pearson(preds, labels) -> float:
    return float(pearsonr(preds, labels)[0]) if len(preds) > 1 and np.std(preds) > 0 else float("nan")


def _spearman(preds, labels) -> float:
    return float(spearmanr(preds, labels)[0]) if len(preds) > 1 and np.std(preds) > 0 else float("nan")


_REGRESSION = {"mse": lambda p, y: float(mean_squared_error(y, p)), "pearson": _pearson, "spearman": _spearman}
_CLASSIFICATION = {"accuracy": lambda p, y: float(accuracy_score(y, p)),
                   "f1": lambda p, y: float(f1_score(y, p, average="macro"))}


def metric_functions(task: str) -> dict:
    return _REGRESSION if task == "regression" else _CLASSIFICATION


def compute_metrics(task: str, preds: np.ndarray, labels: np.ndarray, losses: np.ndarray | None = None) -> dict:
    """accuracy + macro F1 (classification) or MSE + Pearson + Spearman (regression); + mean loss if given."""
    out = {name: fn(preds, labels) for name, fn in metric_functions(task).items()}
    if losses is not None:
        out["loss"] = float(np.mean(losses))
    return out


def confidence_intervals(task: str, preds: np.ndarray, labels: np.ndarray, resamples: int = 1000,
                         level: float = 0.95, seed: int = 0) -> dict:
    """{metric: [low, high]}: percentile bootstrap over examples (scipy.stats.bootstrap, pairs resampled together)."""
    out = {}
    for name, fn in metric_functions(task).items():
        if len(preds) < 2:
            out[name] = [float("nan"), float("nan")]
            continue
        res = bootstrap((preds, labels), fn, paired=True, vectorized=False, n_resamples=resamples,
                        confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
        out[name] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return out
