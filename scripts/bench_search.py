"""Hyperparameter search side by side: HF `Trainer.hyperparameter_search(backend="optuna")` (the usual recipe: a
`model_init` that loads the full model and freezes the trial's bottom k layers by requires_grad=False, evaluation and
pruning every --eval-every steps) against this product's `search` (one multi-depth cache, precomputed once, then
every trial trains the top from it), on the same rows, split, space, sampler (TPE, same seed), pruner (median) and
number of trials. Each side runs in its own fresh process, one after the other. Then ours again with 2 worker
processes on one study (cache present), against ours' trials with 1 worker.

The space (both sides suggest the same names in the same order, so TPE's seeded start-up trials coincide):
  lr log-uniform [1e-5, 1e-3], k categorical {4, 5, 6} (6 = head only), warmup_ratio uniform [0, 0.2], seed {1, 2, 3}

Both objectives are validation accuracy. Ours takes a run's best evaluation; HF's trial value is its last
evaluation, so the table gives HF's best evaluation too (the maximum of what its trials reported).

Usage: python scripts/bench_search.py [--trials 16] [--examples 4000] [--eval-every 25] [--out cache/bench-search]
Writes OUT/bench_search.json and .md and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

SPACE = {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
         "k": {"type": "categorical", "choices": [4, 5, 6]},
         "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
         "seed": {"type": "int", "low": 1, "high": 3}}


def _counts(study) -> dict:
    import optuna

    S = optuna.trial.TrialState
    done = [t for t in study.trials if t.state in (S.COMPLETE, S.PRUNED)]
    return {"trials": len(done), "pruned": sum(t.state == S.PRUNED for t in done),
            "best_value": study.best_value, "best_params": study.best_params,
            "best_evaluation": max(v for t in done for v in t.intermediate_values.values()),
            "per_k": {str(k): sum(t.params.get("k") == k for t in done) for k in SPACE["k"]["choices"]}}


def hf_search(cfg, trials: int, eval_every: int, work: str) -> dict:
    """The usual recipe: Trainer.hyperparameter_search with Optuna, the bottom frozen per trial in model_init."""
    from dataclasses import replace

    import numpy as np
    import optuna
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from bench import _frozen_full_model, _tokenized

    t0 = time.perf_counter()
    data, tok, rows = _tokenized(cfg)  # the product's own split and tokenisation

    def model_init(trial):
        # transformers calls model_init before it applies the trial's hp_space, so draw the trial's values here
        # (Optuna returns the same values when the Trainer asks again); the head is drawn from the trial's seed
        if trial is None:
            return _frozen_full_model(cfg, data)
        hp_space(trial)
        return _frozen_full_model(replace(cfg, k=trial.params["k"], seed=trial.params["seed"]), data)

    def hp_space(trial):  # the same names, distributions and order as ours
        return {"learning_rate": trial.suggest_float("lr", 1e-5, 1e-3, log=True),
                "k": trial.suggest_categorical("k", [4, 5, 6]),  # read by model_init (not a TrainingArguments field)
                "warmup_steps": trial.suggest_float("warmup_ratio", 0.0, 0.2),  # a float < 1 is a ratio
                "seed": trial.suggest_int("seed", 1, 3)}

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    args = TrainingArguments(
        output_dir=os.path.join(work, "hf"), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="linear",
        eval_strategy="steps", eval_steps=eval_every, save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=Dataset.from_list(rows["train"]),
                      eval_dataset=Dataset.from_list(rows["validation"]), data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok, compute_metrics=accuracy)
    storage = f"sqlite:///{os.path.join(work, 'hf.db')}"
    trainer.hyperparameter_search(direction="maximize", backend="optuna", hp_space=hp_space, n_trials=trials,
                                  compute_objective=lambda m: m["eval_accuracy"], study_name="hf", storage=storage,
                                  sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                                  pruner=optuna.pruners.MedianPruner())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, **_counts(optuna.load_study(study_name="hf", storage=storage))}


def ours_search(cfg, trials: int, eval_every: int, work: str, jobs: int = 1, name: str = "ours") -> dict:
    """This product: precompute the depths the space names once (a no-op when the cache is there), then search."""
    from dataclasses import replace

    from pipeline import precompute, search

    space = os.path.join(work, f"{name}.json")
    with open(space, "w") as fh:
        json.dump({"name": name, "base": {"epochs": cfg.epochs, "eval_every": eval_every, "checkpoint_every": -1},
                   "space": SPACE}, fh)
    t0 = time.perf_counter()
    precompute(replace(cfg, depths="4,5,6", k=4))
    pre = time.perf_counter() - t0
    result = search(cfg, space, trials=trials, sampler="tpe", pruner="median", jobs=jobs)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "precompute_seconds": pre, "trial_seconds": seconds - pre, "jobs": jobs,
            **_counts(result.study)}


def _child(name, cfg_dict, *args) -> dict:
    os.chdir(ROOT)
    from pipeline.cli import quiet_libraries

    quiet_libraries()
    from pipeline import Config

    return {"hf": hf_search, "ours": ours_search}[name](Config.from_dict(cfg_dict), *args)


def isolated(name, cfg, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_child, name, cfg.to_dict(), *args).result()


def markdown(r: dict, meta: dict) -> str:
    hf, one, two = r["hf"], r["ours"], r["ours_2_workers"]

    def row(label, x, secs):
        return (f"| {label} | {secs:.1f} s | {x['trials']} ({x['pruned']} pruned) | "
                f"{x['per_k']['4']}/{x['per_k']['5']}/{x['per_k']['6']} | {x['best_value']:.4f} | "
                f"{x['best_evaluation']:.4f} | " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in x["best_params"].items()) + " |")
    lines = [f"Search benchmark: {meta['trials']} trials, TPE seed {meta['seed']}, median pruner, evaluation every "
             f"{meta['eval_every']} steps, {meta['examples']} examples of the default data (MiniLM, 1 epoch); "
             f"{meta['machine']}, {meta['date']}.", "",
             "| method | wall time | trials | trials at k=4/5/6 | best trial's value | best evaluation | best params |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             row("HF Trainer.hyperparameter_search (optuna), frozen by requires_grad", hf, hf["seconds"]),
             row(f"ours, 1 worker (precompute {one['precompute_seconds']:.1f} s included)", one, one["seconds"]),
             row("ours, 2 workers (cache present)", two, two["seconds"]), "",
             f"- wall time ratio HF / ours (1 worker, precompute included): **{r['ratio_wall']:.2f}x**",
             f"- best evaluation: ours {one['best_evaluation']:.4f} vs HF {hf['best_evaluation']:.4f} "
             f"(difference {100 * (one['best_evaluation'] - hf['best_evaluation']):+.2f} points)",
             f"- ours' trials, 1 worker vs 2 workers (cache present in both): {one['trial_seconds']:.1f} s vs "
             f"{two['seconds']:.1f} s = **{r['ratio_workers']:.2f}x**"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--examples", type=int, default=4000, help="a fixed-seed subset of the default data")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--out", default="cache/bench-search")
    args = ap.parse_args(argv)
    from pipeline import make_config

    out = os.path.join(ROOT, args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cfg = make_config("default", max_examples=args.examples, epochs=1, depths="4,5,6",
                      cache_dir=os.path.join(out, "cache"), runs_dir=os.path.join(out, "runs"))
    r = {"hf": isolated("hf", cfg, args.trials, args.eval_every, out),
         "ours": isolated("ours", cfg, args.trials, args.eval_every, out)}
    r["ours_2_workers"] = isolated("ours", cfg, args.trials, args.eval_every, out, 2, "ours2")
    r["ratio_wall"] = r["hf"]["seconds"] / r["ours"]["seconds"]
    r["ratio_workers"] = r["ours"]["trial_seconds"] / r["ours_2_workers"]["seconds"]
    meta = {"trials": args.trials, "seed": cfg.seed, "eval_every": args.eval_every, "examples": args.examples,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d")}
    md = markdown(r, meta)
    with open(os.path.join(out, "bench_search.json"), "w") as fh:
        json.dump({"meta": meta, **r}, fh, indent=2)
    with open(os.path.join(out, "bench_search.md"), "w") as fh:
        fh.write(md)
    print(md)
    print(f"ratio_wall={r['ratio_wall']:.3f} ratio_workers={r['ratio_workers']:.3f} "
          f"best_eval_diff_points={100 * (r['ours']['best_evaluation'] - r['hf']['best_evaluation']):.2f}")


if __name__ == "__main__":
    main()
