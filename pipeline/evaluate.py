"""Score a finished run: a cached split (test by default) through the run's top alone, or an external labeled file
through the frozen bottom + top. Metrics with bootstrap 95% confidence intervals, written into the run directory."""
from __future__ import annotations

import csv
import os
from dataclasses import replace

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .cache import CachedSplit, open_cache
from .config import Config
from .errors import PipelineError
from .metrics import compute_metrics, confidence_intervals
from .model import load_top
from .rundir import CONFIG, TOP, RunDir
from .train import make_loader, predictions, score


def evaluate_run(run_dir: str, split: str = "test", dataset: str | None = None, overrides: dict | None = None,
                 resamples: int = 1000, batch_size: int | None = None, save_predictions: bool = False) -> dict:
    run = RunDir(run_dir)
    cfg = run.config()
    results = run.results()  # a finished run, with a clear message otherwise
    if batch_size:
        cfg = replace(cfg, eval_batch_size=batch_size)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    if dataset is None:
        name, (preds, labels, losses, ids) = split, _cached(run, cfg, split, device)
    else:
        cfg = replace(cfg, dataset=dataset, split="train", max_examples=0, **(overrides or {}))
        name, (preds, labels, losses, ids) = cfg.data_name(), _external(run, cfg, device)
    metrics = compute_metrics(cfg.task, preds, labels, losses)
    ci = confidence_intervals(cfg.task, preds, labels, resamples=resamples)
    result = {"split": split if dataset is None else None, "dataset": dataset, "examples": int(len(labels)),
              "metrics": metrics, "ci95": ci, "bootstrap_resamples": resamples, "run": run.path,
              "best_step": results["best"]["step"]}
    path = run.write_eval(name, result)
    if save_predictions:
        names = run.read_json(CONFIG)["label_names"] if cfg.task == "classification" else None
        out = _write_predictions(run.file(f"predictions_{name}.csv"), ids, labels, preds, losses, names)
        print(f"per-example predictions -> {out}")
    what = f"{split} split of the cache" if dataset is None else dataset
    print(f"evaluated {run.path} on the {what}: {len(labels)} examples -> {path}")
    print(" ".join(f"{k}={v:.4f}" + (f" [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if k in ci else "")
                   for k, v in metrics.items()) + "  (95% bootstrap CI)")
    return result


def _write_predictions(path: str, ids, labels, preds, losses, names: list | None) -> str:
    """One row per example, in example order: its row in the data, the label, the prediction and its loss."""
    order = np.argsort(ids, kind="stable")
    show = (lambda v: names[int(v)]) if names else (lambda v: repr(float(v)))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["example", "label", "prediction", "loss"])
        w.writerows([int(ids[i]), show(labels[i]), show(preds[i]), f"{float(losses[i]):.9g}"] for i in order)
    return path


def _top(run: RunDir, cfg: Config, info) -> tuple[torch.nn.Module, int]:
    """The run's result (top.safetensors: the best evaluation) at its depth, on the frozen weights it was trained on."""
    top_file = run.file(TOP)
    with safe_open(top_file, "pt") as st:
        k = int(st.metadata()["k"])
    model, digest = load_top(replace(cfg, k=k, stages="", depths=""), info.num_labels, info.label_names)
    if digest != info.weights_sha256[k]:
        raise PipelineError(f"the frozen weights of {cfg.model!r} changed since {run.path} was trained; its top "
                            f"would sit on other layers. Evaluate with the model the run was trained with.")
    model.load_state_dict(load_file(top_file))
    return model.eval(), k


def _cached(run: RunDir, cfg: Config, split: str, device):
    path = run.read_json(CONFIG)["cache"]
    if not os.path.isfile(path):
        raise PipelineError(f"the cache {path} that {run.path} was trained from is gone; rebuild it with the run's "
                            f"options (`make precompute` with its config.json), or score a file with --dataset.")
    info = open_cache(path, cfg)
    if split not in info.splits:
        why = " (the run's test_fraction is 0)" if split == "test" and cfg.test_fraction == 0 else ""
        raise PipelineError(f"cache {path} has no {split!r} split{why}; it holds {sorted(info.splits)}. Choose one "
                            f"of those with --split, or score a labeled file with --dataset.")
    model, k = _top(run, cfg, info)
    ds = CachedSplit(path, split, k)
    loader = make_loader(ds, cfg, False, False, torch.Generator())  # storage order: example_ids line up
    return (*predictions(model.to(device), _on(loader, device), None, cfg.task), ds.example_ids)


def _on(loader, device):
    for batch in loader:
        yield {n: t.to(device) for n, t in batch.items()}


def _external(run: RunDir, cfg: Config, device):
    """Tokenise the file like precompute did and run the merged model (frozen bottom + the run's top)."""
    from .data import load_for_eval
    from .export import merged_model

    model, tokenizer, _ = merged_model(run.path)
    label_names = run.read_json(CONFIG)["label_names"]
    ds, labels = load_for_eval(cfg, label_names if cfg.task == "classification" else None)
    model = model.to(device)
    preds, losses = [], []
    with torch.inference_mode():
        for start in range(0, len(ds), cfg.eval_batch_size):
            rows = ds[start:start + cfg.eval_batch_size]
            pair = rows[cfg.text_pair_column] if cfg.text_pair_column else None
            enc = tokenizer(rows[cfg.text_column], pair, truncation=True, max_length=cfg.max_length, padding=True,
                            return_tensors="pt").to(device)
            logits = model(**enc).logits
            p, loss = score(logits, torch.from_numpy(labels[start:start + len(logits)]).to(device), cfg.task)
            preds.append(p.cpu())
            losses.append(loss.cpu())
    return torch.cat(preds).numpy(), labels, torch.cat(losses).numpy(), np.arange(len(labels))
