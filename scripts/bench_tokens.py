"""Token classification side by side: the usual recipe (HF Trainer + AutoModelForTokenClassification on the whole
model, embeddings + layers [0, k) requires_grad=False, DataCollatorForTokenClassification) against this product
(precompute once, then train from the cache), on the same sentences, split, seed, schedule and batch size. Each
method runs in its own fresh process (peak RSS per method). Both are scored on the same test sentences by the
same code (first sub-token of each word, seqeval entity F1, bootstrap over sentences).

Shapes:
  wnut       the `ner` preset: packaged all-MiniLM-L6-v2 (k=4 of 6) on the WNUT-2016 tweets, its epochs and lr
  bert-base  a bert-base-uncased-shaped encoder (12 layers, hidden 768; random weights built locally, offline)
             with 10 of 12 layers frozen, on the same tweets, 1 epoch: the speed and memory row

Usage: python scripts/bench_tokens.py [--shapes wnut,bert-base] [--epochs E] [--out DIR]
Writes DIR/bench_tokens-<shapes>.json and .md and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _measured(name, cfg_dict) -> dict:
    """One method in this (fresh) process, with its peak RSS."""
    os.chdir(ROOT)
    from pipeline.cli import quiet_libraries

    quiet_libraries()
    from pipeline import Config

    result = METHODS[name](Config.from_dict(cfg_dict))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_isolated(name, cfg) -> dict:
    """A fresh spawned process per method (its exceptions come back with their traceback)."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_measured, name, cfg.to_dict()).result()


def _score(cfg, logits_by_sentence, data, names, resamples=1000) -> dict:
    """Entity metrics (the product's task code) of per-token logits on the test sentences, with 95% CIs."""
    import numpy as np

    from pipeline.tasks import IGNORE, TASKS, Outputs

    task = TASKS["token-classification"]
    preds, labels, groups = [], [], []
    for i, (logits, targets) in enumerate(logits_by_sentence):
        keep = targets != IGNORE
        preds.append(logits.argmax(-1)[keep])
        labels.append(targets[keep])
        groups.append(np.full(int(keep.sum()), i))
    out = Outputs(np.concatenate(preds), np.concatenate(labels), np.zeros(sum(map(len, labels))),
                  np.concatenate(groups))
    metrics = task.metrics(out, names)
    metrics.pop("loss")  # the usual side's logits come without the product's per-token losses
    return {"metrics": metrics,
            "ci95": task.intervals(out, names, resamples=resamples) if resamples else {}}


def _encoded(cfg):
    """The product's split and encoding (the task's encode) of every split: token ids and per-token targets."""
    from pipeline.data import load_labeled, tag_index
    from pipeline.model import load_tokenizer
    from pipeline.tasks import TASKS

    data = load_labeled(cfg)
    tok = load_tokenizer(cfg)
    task = TASKS[cfg.task]
    enc = data.ds.map(task.encode, batched=True, remove_columns=data.ds.column_names,
                      fn_kwargs=dict(tokenizer=tok, cfg=cfg, label_index=tag_index(data.ds, cfg, data.label_names)))
    rows = {s: [{"input_ids": enc[int(i)]["input_ids"], "labels": enc[int(i)]["token_labels"]} for i in idx]
            for s, idx in data.splits.items()}
    return data, tok, rows


def usual(cfg) -> dict:
    """HF Trainer on the whole token-classification model, the bottom frozen by requires_grad=False."""
    import numpy as np
    import torch
    from accelerate.utils import set_seed
    from datasets import Dataset
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

    from pipeline.model import load_full_model, model_arch

    data, tok, rows = _encoded(cfg)
    set_seed(cfg.seed)
    model = load_full_model(cfg, len(data.label_names), data.label_names)
    arch = model_arch(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not arch.is_frozen(name, cfg.k))
    def compute_metrics(pred):
        logits = [(p[:len(r["labels"])], np.asarray(r["labels"])) for p, r in zip(pred.predictions, rows["validation"])]
        return _score(cfg, logits, data, data.label_names, resamples=0)["metrics"]

    with tempfile.TemporaryDirectory() as out:
        # the usual recipe's model selection: evaluate each epoch, keep the best validation entity F1
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.batch_size,
                                 per_device_eval_batch_size=cfg.eval_batch_size, learning_rate=cfg.lr,
                                 num_train_epochs=cfg.epochs, warmup_steps=cfg.warmup_ratio,
                                 weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                                 lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="epoch",
                                 save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="f1",
                                 report_to=[], logging_strategy="no", dataloader_num_workers=0,
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows["train"]),
                          eval_dataset=Dataset.from_list(rows["validation"]), compute_metrics=compute_metrics,
                          data_collator=DataCollatorForTokenClassification(tok))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        pred = trainer.predict(Dataset.from_list(rows["test"]))
    logits = [(pred.predictions[i][:len(r["labels"])], np.asarray(r["labels"])) for i, r in enumerate(rows["test"])]
    tokens = sum(len(r["input_ids"]) for r in rows["train"]) * cfg.epochs
    # wall time of trainer.train(): epochs with their evaluations and checkpoint saves (the recipe's real cost)
    return {"train_seconds": seconds, "epoch_seconds": seconds / cfg.epochs, "tokens_per_s": tokens / seconds,
            **_score(cfg, logits, data, data.label_names)}


def ours(cfg) -> dict:
    """precompute + train (the product's code path), then the best top scored on the cached test split."""
    from pipeline.evaluate import evaluate_run
    from pipeline.precompute import precompute
    from pipeline.train import train

    t0 = time.perf_counter()
    path = precompute(cfg)
    pre = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = train(cfg, cache_path=path)
    seconds = time.perf_counter() - t1  # epochs with their evaluations (and loading the top), like the Trainer's
    from pipeline.rundir import RunDir

    records = RunDir(res["run_dir"]).metrics()
    ev = evaluate_run(res["run_dir"], "test", resamples=1000)
    return {"precompute_seconds": pre, "train_seconds": seconds, "epoch_seconds": seconds / cfg.epochs,
            "tokens_per_s": records[-1]["train_tokens_per_s"], "metrics": ev["metrics"], "ci95": ev["ci95"]}


METHODS = {"usual": usual, "ours": ours}


def bert_base_folder(work: str) -> str:
    """A bert-base-uncased-shaped encoder with random weights and the packaged WordPiece tokenizer, saved once."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from pipeline.config import PACKAGED_MINILM
    from pipeline.model import resolve_model_path

    path = os.path.join(work, "bert-base-shape")
    if not os.path.isdir(path):
        import torch

        torch.manual_seed(0)
        BertForTokenClassification(BertConfig()).save_pretrained(path)  # 12 layers, hidden 768, vocab 30522
        AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM)).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="wnut,bert-base")
    ap.add_argument("--epochs", type=int, default=0, help="override the shape's epochs")
    ap.add_argument("--out", default=os.path.join(ROOT, "cache", "bench_tokens"))
    args = ap.parse_args()
    from pipeline import make_config

    os.makedirs(args.out, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        runs = os.path.join(args.out, "runs")
        common = dict(cache_dir=os.path.join(args.out, f"cache-{shape}"), runs_dir=runs, checkpoint_every=-1,
                      run_name=f"{shape}-{time.strftime('%Y%m%d-%H%M%S')}")
        if shape == "wnut":
            cfg = make_config("ner", **common)
        else:
            cfg = make_config("ner", model=bert_base_folder(args.out), k=10, epochs=1, lr=5e-5, **common)
        if args.epochs:
            from dataclasses import replace

            cfg = replace(cfg, epochs=args.epochs)
        import shutil

        shutil.rmtree(cfg.cache_dir, ignore_errors=True)  # precompute really runs
        result = {"shape": shape, "model": cfg.model, "k": cfg.k, "epochs": cfg.epochs, "lr": cfg.lr}
        for name in ("usual", "ours"):
            print(f"[{shape}] {name} ...", flush=True)
            result[name] = run_isolated(name, cfg)
        u, o = result["usual"], result["ours"]
        result["epoch_speedup"] = u["epoch_seconds"] / o["epoch_seconds"]
        result["end_to_end_speedup"] = u["train_seconds"] / (o["precompute_seconds"] + o["train_seconds"])
        rows.append(result)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    with open(os.path.join(args.out, f"bench_tokens-{args.shapes.replace(',', '_')}.json"), "w") as fh:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": machine, "rows": rows}, fh, indent=2)

    def f1(m):
        r = m["metrics"]
        return f"{r['f1']:.4f} [{m['ci95']['f1'][0]:.4f}, {m['ci95']['f1'][1]:.4f}]"
    lines = ["| shape | method | epoch s | tok/s | precompute s | test entity F1 [95% CI] | token acc | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for name in ("usual", "ours"):
            m = r[name]
            lines.append(f"| {r['shape']} (k={r['k']}, {r['epochs']} ep) | {name} | {m['epoch_seconds']:.1f} | "
                         f"{m['tokens_per_s']:.0f} | {m.get('precompute_seconds', 0):.1f} | {f1(m)} | "
                         f"{m['metrics']['accuracy']:.4f} | {m['peak_rss_mb']:.0f} |")
        lines.append(f"| {r['shape']} | **ratio** | **{r['epoch_speedup']:.2f}x** per epoch | | end to end "
                     f"(precompute + training vs training) **{r['end_to_end_speedup']:.2f}x** | | | "
                     f"{r['ours']['peak_rss_mb'] / r['usual']['peak_rss_mb']:.0%} |")
    md = "\n".join(lines)
    with open(os.path.join(args.out, f"bench_tokens-{args.shapes.replace(',', '_')}.md"), "w") as fh:
        fh.write(f"{machine}, {time.strftime('%Y-%m-%d')}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
