"""Score a finished run: a cached split (test by default) through the run's top alone, or an external labeled file
through the frozen bottom + top. The task's metrics with bootstrap 95% confidence intervals (per-token tasks:
resampling whole sentences, plus a per-entity-type table), written into the run directory."""
from __future__ import annotations

import csv
import os
from dataclasses import replace

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .cache import CachedSplit, open_cache, pad_lists, split_column
from .config import Config
from .errors import PipelineError
from .model import check_frozen_weights, load_top
from .rundir import CONFIG, TOP, RunDir
from .tasks import IGNORE, Outputs, task_for
from .train import make_loader, predictions


def evaluate_run(run_dir: str, split: str = "test", dataset: str | None = None, overrides: dict | None = None,
                 resamples: int = 1000, batch_size: int | None = None, save_predictions: bool = False) -> dict:
    run = RunDir(run_dir)
    cfg = run.config()
    results = run.results()  # a finished run, with a clear message otherwise
    task, names = task_for(cfg.task), run.read_json(CONFIG)["label_names"]
    if batch_size:
        cfg = replace(cfg, eval_batch_size=batch_size)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    if dataset is None:
        name, (out, ids, cut) = split, _cached(run, cfg, split, device)
    else:
        cfg = replace(cfg, dataset=dataset, split="train", max_examples=0, **(overrides or {}))
        name, (out, ids, cut) = cfg.data_name(), _external(run, cfg, names, device)
    thresholds = run.thresholds()
    out, _ = task.decide(out, thresholds=thresholds)  # multi-label: the run's thresholds
    metrics = task.metrics(out, names)
    ci = task.intervals(out, names, resamples=resamples)
    result = {"split": split if dataset is None else None, "dataset": dataset, "examples": out.examples,
              "metrics": metrics, "ci95": ci, "bootstrap_resamples": resamples, "run": run.path,
              "best_step": results["best"]["step"]}
    if thresholds:
        result["thresholds"] = dict(zip(names, thresholds))
    if task.per_token:
        result.update({"scored_tokens": int(len(out.labels)), "words_cut": int(cut.sum()),
                       "sentences_cut": int((cut > 0).sum()), "per_type": task.entity_report(out, names)})
    path = run.write_eval(name, result)
    if save_predictions:
        written = _write_predictions(run.file(f"predictions_{name}.csv"), ids, out, names)
        print(f"per-{'token' if task.per_token else 'example'} predictions -> {written}")
    what = f"{split} split of the cache" if dataset is None else dataset
    print(f"evaluated {run.path} on the {what}: {out.examples} examples -> {path}")
    if task.per_token:
        print(f"{len(out.labels)} scored tokens; max_length cut {int(cut.sum())} words off {int((cut > 0).sum())} "
              f"sentences: they are not scored")
        for entity, row in (result["per_type"] or {}).items():
            print(f"  {entity:>16}  precision={row['precision']:.4f} recall={row['recall']:.4f} "
                  f"f1={row['f1-score']:.4f} support={int(row['support'])}")
    print(" ".join(f"{k}={v:.4f}" + (f" [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if k in ci else "")
                   for k, v in task.headline(metrics).items()) + "  (95% bootstrap CI)")
    return result


def _write_predictions(path: str, ids, out: Outputs, names: list | None) -> str:
    """One row per scored item (an example, or a scored token with its position), in example order: the example's
    row in the data, the label, the prediction and its loss."""
    example = ids if out.groups is None else ids[out.groups]
    order = np.argsort(example, kind="stable")
    show = (lambda v: names[int(v)]) if names else (lambda v: repr(float(v)))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["example", "label", "prediction", "loss"])
        w.writerows([int(example[i]), show(out.labels[i]), show(out.preds[i]), f"{float(out.losses[i]):.9g}"]
                    for i in order)
    return path


def _top(run: RunDir, cfg: Config, info) -> tuple[torch.nn.Module, int]:
    """The run's result (top.safetensors: the best evaluation) at its depth, on the frozen weights it was trained on."""
    top_file = run.file(TOP)
    with safe_open(top_file, "pt") as st:
        k = int(st.metadata()["k"])
    model, digest = load_top(replace(cfg, k=k, stages="", depths=""), info.num_labels, info.label_names)
    check_frozen_weights(digest, info.weights_sha256[k], cfg, k, f"the cache {run.path} was trained from",
                         "Evaluate with the model the run was trained with.")
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
    cut = split_column(path, split, "words_cut")
    return predictions(model.to(device), _on(loader, device), None, task_for(cfg.task)), ds.example_ids, cut


def _on(loader, device):
    for batch in loader:
        yield {n: t.to(device) for n, t in batch.items()}


def _external(run: RunDir, cfg: Config, names, device):
    """Tokenise the file as precompute does (the task's encode) and run the merged model (frozen bottom + the
    run's top) through the same inference loop."""
    from .data import load_for_eval, tag_index
    from .export import merged_model

    model, tokenizer, _ = merged_model(run.path)
    task = task_for(cfg.task)
    ds, labels = load_for_eval(cfg, names)
    index = tag_index(ds, cfg, names) if task.per_token else None
    tokens = ds.map(task.encode, batched=True, batch_size=1000, remove_columns=ds.column_names,
                    fn_kwargs=dict(tokenizer=tokenizer, cfg=cfg, label_index=index), desc="tokenize")
    model = model.to(device)
    pad = tokenizer.pad_token_id or 0

    def batches():
        for start in range(0, len(tokens), cfg.eval_batch_size):
            rows = tokens[start:start + cfg.eval_batch_size]
            batch = pad_lists(rows, {"input_ids": pad, "token_type_ids": 0, "token_labels": IGNORE})
            end = start + len(rows["length"])
            batch["labels"] = batch.pop("token_labels") if task.per_token else labels[start:end]
            yield {n: torch.from_numpy(np.asarray(t)).to(device) for n, t in batch.items()}

    out = predictions(model, batches(), None, task)
    cut = np.asarray(tokens["words_cut"]) if task.per_token else np.zeros(len(tokens), dtype=np.int64)
    return out, np.arange(len(tokens)), cut
