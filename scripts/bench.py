"""Side-by-side benchmark: the usual frozen-layer recipe vs precompute-once + train-from-cache.

One invocation runs, on the same data, split, seed and batch size, each method in its own fresh process (so that
peak memory is measured per method):
  A      HF Trainer on the full model, embeddings + layers [0, k) requires_grad=False, dynamic padding
  B      a plain PyTorch loop on the same frozen full model (the Trainer's own overhead becomes visible)
  ours   `precompute` once, then `train` from the cache: the product's real code path
  limit  the top model's forward+backward+step on the same batches, pre-collated in memory (no I/O, no collate)
  peers  what people pick instead (--peers, on by default): LoRA r=8 (peft) on q,k,v of every layer of the full
         model, and a SetFit-style linear head on the frozen body's mean-pooled embedding (the body re-runs on
         every batch of every epoch); each with its usual learning rate (5e-4 and 1e-2)
plus `bottom`, a plain inference_mode forward of the bottom over the same batches (precompute's ceiling), and a
profile of ours' training step (data, forward, backward, optimizer).

Usage:  python scripts/bench.py [--shape minilm|bert-base|both] [--samples N] [--epochs E] [--batch-size B]
                                [--quick] [--out DIR]
Writes DIR/bench.json and DIR/bench.md and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
import math
import multiprocessing as mp
import os
import shutil
import platform
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(name, cfg_dict, extra, queue):
    os.chdir(ROOT)
    from pipeline.cli import quiet_libraries

    quiet_libraries()
    import torch

    from pipeline import Config

    cfg = Config.from_dict(cfg_dict)
    start_rss = current_rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        result = METHODS[name](cfg, **extra)
    except Exception as e:  # report, don't hang the parent
        import traceback

        queue.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return
    result["peak_rss_mb"] = peak_rss_mb()
    result["rss_after_imports_mb"] = start_rss
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(result)


def run_isolated(name: str, cfg, **extra) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, cfg.to_dict(), extra, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{name} failed: {result['error']}\n{result['traceback']}")
    return result


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _encode(cfg, data, tok, idx) -> dict:
    """The product's tokenisation (the task's encode, as precompute does it) of these rows: {input_ids,
    token_type_ids for pairs} as lists."""
    from pipeline.tasks import task_for

    texts, pairs = data.texts_at(idx)
    batch = {cfg.text_column: texts, **({cfg.text_pair_column: pairs} if pairs is not None else {})}
    enc = task_for(cfg.task).encode(batch, tok, cfg)
    return {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}


def _tokenized(cfg):
    """Train/validation token ids of the product's own split (same rows, same order as the cache was built from)."""
    from pipeline.data import load_labeled
    from pipeline.model import load_tokenizer

    data = load_labeled(cfg)
    tok = load_tokenizer(cfg)
    out = {}
    for split in ("train", "validation"):
        idx = data.splits[split]
        enc = _encode(cfg, data, tok, idx)
        out[split] = [{**{k: enc[k][j] for k in enc}, "labels": int(data.labels[i])} for j, i in enumerate(idx)]
    return data, tok, out


def _frozen_full_model(cfg, data):
    from accelerate.utils import set_seed

    from pipeline.model import load_full_model, model_arch

    set_seed(cfg.seed)
    model = load_full_model(cfg, len(data.label_names), data.label_names)
    arch = model_arch(model)
    for name, p in model.named_parameters():  # what the bottom computes with: embeddings + layers [0, k)
        p.requires_grad_(not arch.is_frozen(name, cfg.k))
    return model


def _metrics(preds, labels):
    from pipeline.tasks import TASKS

    return TASKS["classification"]._metrics(preds, labels, None)


def _real_tokens(rows):
    return sum(len(r["input_ids"]) for r in rows)


# ----------------------------------------------------------------------------------------------- methods
def baseline_trainer(cfg, grouped=False):
    """A: the usual recipe, HF Trainer + DataCollatorWithPadding on the frozen full model (grouped=True: the
    Trainer's own length grouping, train_sampling_strategy="group_by_length")."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    data, tok, rows = _tokenized(cfg)
    model = _frozen_full_model(cfg, data)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
            num_train_epochs=cfg.epochs, learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="linear",
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", seed=cfg.seed,
            disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16",
            train_sampling_strategy="group_by_length" if grouped else "random")
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows["train"]),
                          data_collator=DataCollatorWithPadding(tok), processing_class=tok)
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
        pred = trainer.predict(Dataset.from_list(rows["validation"]))
    m = _metrics(np.argmax(pred.predictions, -1), pred.label_ids)
    tokens = _real_tokens(rows["train"])
    return {"epoch_s": secs / cfg.epochs, "tokens_per_s": tokens * cfg.epochs / secs, **m}


def baseline_loop(cfg):
    """B: a plain PyTorch loop on the same frozen full model, same collator, optimizer and schedule."""
    data, tok, rows = _tokenized(cfg)
    return _plain_loop(cfg, _frozen_full_model(cfg, data), tok, rows, cfg.lr)


def _plain_loop(cfg, model, tok, rows, lr):
    """Train `model`'s trainable parameters with AdamW + linear schedule over shuffled padded batches of token ids,
    then score the validation split: epoch seconds, tokens/s, accuracy, F1."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from pipeline.train import build_optimizer

    dev = _device()
    model = model.to(dev)
    collate = DataCollatorWithPadding(tok)
    g = torch.Generator().manual_seed(cfg.seed)
    dl = DataLoader(rows["train"], batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=g)
    opt, sched = build_optimizer(model, replace(cfg, lr=lr), len(dl) * cfg.epochs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    epoch_s = []
    for _ in range(cfg.epochs):
        t0 = time.perf_counter()
        for batch in dl:
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        _sync()
        epoch_s.append(time.perf_counter() - t0)
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(rows["validation"], batch_size=cfg.eval_batch_size, collate_fn=collate):
            batch = {k: v.to(dev) for k, v in batch.items()}
            preds.append(model(**batch).logits.argmax(-1).cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    tokens = _real_tokens(rows["train"])
    return {"epoch_s": sum(epoch_s) / len(epoch_s), "tokens_per_s": tokens * len(epoch_s) / sum(epoch_s),
            "trainable_params": sum(p.numel() for p in trainable),
            **_metrics(np.concatenate(preds), np.concatenate(labels))}


def peer_lora(cfg, lr=5e-4, r=8):
    """Peer: LoRA (peft) on the full model, what people on small GPUs pick instead: rank-r adapters on the query,
    key and value projections of every layer + the classification head, nothing frozen away from the forward."""
    from peft import LoraConfig, TaskType, get_peft_model
    from accelerate.utils import set_seed

    from pipeline.model import load_full_model

    data, tok, rows = _tokenized(cfg)
    set_seed(cfg.seed)
    model = load_full_model(cfg, len(data.label_names), data.label_names)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=2 * r, lora_dropout=0.1,
                                             target_modules=["query", "key", "value"]))
    return {**_plain_loop(cfg, model, tok, rows, lr), "lr": lr, "r": r}


def peer_setfit_head(cfg, lr=1e-2):
    """Peer: a SetFit-style differentiable head (SetFit's phase 2 with the body frozen): the whole frozen body
    re-runs on every batch of every epoch, its mean-pooled, normalised sentence embedding feeds a linear head."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModel, DataCollatorWithPadding

    from pipeline.model import resolve_model_path

    data, tok, rows = _tokenized(cfg)
    dev = _device()
    torch.manual_seed(cfg.seed)
    body = AutoModel.from_pretrained(resolve_model_path(cfg.model)).to(dev).eval().requires_grad_(False)
    head = torch.nn.Linear(body.config.hidden_size, len(data.label_names)).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    collate = DataCollatorWithPadding(tok)
    g = torch.Generator().manual_seed(cfg.seed)
    dl = DataLoader(rows["train"], batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=g)

    def embed(batch):
        labels = batch.pop("labels")
        with torch.no_grad():
            h = body(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1), labels

    epoch_s = []
    for _ in range(cfg.epochs):
        t0 = time.perf_counter()
        for batch in dl:
            x, y = embed({k: v.to(dev) for k, v in batch.items()})
            loss = torch.nn.functional.cross_entropy(head(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync()
        epoch_s.append(time.perf_counter() - t0)
    preds, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(rows["validation"], batch_size=cfg.eval_batch_size, collate_fn=collate):
            x, y = embed({k: v.to(dev) for k, v in batch.items()})
            preds.append(head(x).argmax(-1).cpu().numpy())
            labels.append(y.cpu().numpy())
    tokens = _real_tokens(rows["train"])
    return {"epoch_s": sum(epoch_s) / len(epoch_s), "tokens_per_s": tokens * len(epoch_s) / sum(epoch_s),
            "trainable_params": sum(p.numel() for p in head.parameters()), "lr": lr,
            **_metrics(np.concatenate(preds), np.concatenate(labels))}


def ours_precompute(cfg):
    import h5py

    from pipeline.precompute import precompute

    t0 = time.perf_counter()
    path = precompute(cfg, force=True)
    secs = time.perf_counter() - t0
    with h5py.File(path) as f:
        stats = json.loads(f.attrs["stats_json"])
        hidden = int(f.attrs["hidden_size"])
    size = os.path.getsize(path)
    return {"precompute_s": secs, "loop_s": stats["loop_seconds"], "tokens": stats["tokens"],
            "examples": stats["examples"], "cache_bytes": size,
            "cache_vs_fp16_states": size / (2 * hidden * stats["tokens"]),
            "loop_tokens_per_s": stats["tokens"] / stats["loop_seconds"]}


def ours_train(cfg):
    from pipeline.train import train

    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    from pipeline.rundir import RunDir

    run = RunDir(result["run_dir"])
    recs, last = run.metrics(), run.results()["last_metrics"]
    secs = [r["train_seconds"] for r in recs]
    # the last epoch's validation metrics, like every other row (the best epoch would be picked on the very split
    # that is reported)
    return {"epoch_s": sum(secs) / len(secs), "tokens_per_s": sum(r["train_tokens_per_s"] for r in recs) / len(recs),
            "run_wall_s": wall, "accuracy": last["accuracy"], "f1": last["f1"]}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def limit(cfg):
    """The top's forward+backward+clip+step on ours' exact batches, pre-collated and already on the device."""
    import torch

    from pipeline.cache import CachedSplit, open_cache
    from pipeline.model import load_top
    from pipeline.train import build_optimizer, epoch_seed, make_loader

    info = open_cache(cfg.cache_path(), cfg)
    dev = _device()
    torch.manual_seed(cfg.seed)
    model, _ = load_top(cfg, info.num_labels, info.label_names)
    model.to(dev).train()
    ds = CachedSplit(cfg.cache_path(), "train", cfg.k)
    batches = [{k: (v.float() if k == "inputs_embeds" else v).to(dev) for k, v in b.items()}
               for b in make_loader(ds, cfg, True, False, torch.Generator().manual_seed(epoch_seed(cfg, 1)))]
    opt, sched = build_optimizer(model, cfg, len(batches) * cfg.epochs)
    epoch_s = []
    for _ in range(cfg.epochs):
        _sync()
        t0 = time.perf_counter()
        for b in batches:
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        _sync()
        epoch_s.append(time.perf_counter() - t0)
    tokens = int(ds.lengths.sum())
    return {"epoch_s": sum(epoch_s) / len(epoch_s), "tokens_per_s": tokens * len(epoch_s) / sum(epoch_s)}


def bottom_forward(cfg):
    """Precompute's ceiling: the bottom's inference_mode forward over length-sorted, pre-padded batches."""
    import numpy as np
    import torch

    from pipeline.data import load_labeled
    from pipeline.model import load_bottom, load_tokenizer

    data = load_labeled(cfg)
    tok = load_tokenizer(cfg)
    dev = _device()
    bottom = load_bottom(cfg).to(dev)
    idx = np.concatenate(list(data.splits.values()))
    enc = _encode(cfg, data, tok, idx)
    order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
    bs = cfg.precompute_batch_size
    batches = [tok.pad({k: [enc[k][i] for i in order[s:s + bs]] for k in enc}, return_tensors="pt")
               for s in range(0, len(order), bs)]
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    _sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            bottom(**b)
    _sync()
    secs = time.perf_counter() - t0
    return {"forward_s": secs, "tokens_per_s": tokens / secs}


def profile(cfg, steps=40):
    """Where ours' training step spends its time: I/O (the dataset's one-step gather of the padded batch from the
    memory map, or from the in-RAM copy), collate (to the device, upcast), forward, backward, optimizer (clip + AdamW
    step), over the product's own batch sampler and dataset."""
    import torch

    from pipeline.cache import CachedSplit, open_cache
    from pipeline.model import load_top
    from pipeline.train import build_optimizer, epoch_seed, make_loader

    info = open_cache(cfg.cache_path(), cfg)
    dev = _device()
    out = {}
    for mode, in_memory in (("memmap", False), ("in_memory", True)):
        torch.manual_seed(cfg.seed)
        model, _ = load_top(cfg, info.num_labels, info.label_names)
        model.to(dev).train()
        opt, _ = build_optimizer(model, cfg, steps)
        ds = CachedSplit(cfg.cache_path(), "train", cfg.k, in_memory, reuse_buffers=True)
        batches = list(make_loader(ds, cfg, True, False, torch.Generator().manual_seed(epoch_seed(cfg, 1))).batch_sampler)
        t = dict.fromkeys(("io", "collate", "forward", "backward", "optimizer"), 0.0)
        for n in range(steps):
            t0 = time.perf_counter()
            b = ds.__getitems__(batches[n % len(batches)])
            t1 = time.perf_counter()
            b = {k: (v.float() if k == "inputs_embeds" else v).to(dev) for k, v in b.items()}
            _sync()
            t2 = time.perf_counter()
            loss = model(**b).loss
            _sync()
            t3 = time.perf_counter()
            loss.backward()
            _sync()
            t4 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()
            t5 = time.perf_counter()
            for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                t[key] += dt
        total = sum(t.values())
        out[mode] = {k: {"ms_per_step": 1000 * v / steps, "share": v / total} for k, v in t.items()}
    return out


METHODS = {f.__name__: f for f in (baseline_trainer, baseline_loop, ours_precompute, ours_train, limit,
                                   bottom_forward, profile, peer_lora, peer_setfit_head)}


# ----------------------------------------------------------------------------------------------- driver
def make_bert_base(folder: str) -> str:
    """A randomly initialised bert-base shape (12 layers, hidden 768) with the MiniLM WordPiece tokenizer (the same
    uncased 30,522-token vocabulary), saved locally: timing needs the shape, not trained weights."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.config import PACKAGED_MINILM
    from pipeline.model import resolve_model_path

    path = os.path.join(folder, "bert-base-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig()).save_pretrained(path)
        AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM)).save_pretrained(path)
    return path


def bench_shape(shape: str, args, workdir: str) -> dict:
    from pipeline import make_config
    from pipeline.config import PACKAGED_MINILM

    model, k = (PACKAGED_MINILM, 4) if shape == "minilm" else (make_bert_base(workdir), 10)
    shutil.rmtree(os.path.join(workdir, "runs"), ignore_errors=True)  # the bench's own runs; names repeat
    cfg = make_config(
        "default", model=model, k=k, max_examples=math.ceil(args.samples / 0.8), val_fraction=0.1,
        test_fraction=0.1, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, seed=args.seed,
        cache_dir=os.path.join(workdir, "cache"), runs_dir=os.path.join(workdir, "runs"), run_name=f"ours-{shape}",
        mixed_precision=args.mixed_precision, group_by_length=not args.no_group_by_length)
    r = {"shape": shape, "model": cfg.model if shape == "minilm" else "bert-base (random init)", "k": k}

    def timed(key, name, c=cfg, **extra):
        t0 = time.perf_counter()
        r[key] = run_isolated(name, c, **extra)
        print(f"  [{shape}] {key}: {time.perf_counter() - t0:.1f} s", flush=True)

    # precompute vs a plain forward of the bottom: alternated, best of --repeats each (the machine is noisy)
    for i in range(args.repeats):
        timed(f"bottom_forward_{i}", "bottom_forward")
        timed(f"ours_precompute_{i}", "ours_precompute")
    r["bottom_forward"] = min((r.pop(f"bottom_forward_{i}") for i in range(args.repeats)), key=lambda x: x["forward_s"])
    r["ours_precompute"] = min((r.pop(f"ours_precompute_{i}") for i in range(args.repeats)), key=lambda x: x["loop_s"])
    timed("ours_train", "ours_train")
    timed("limit", "limit")
    timed("baseline_loop", "baseline_loop")
    timed("baseline_trainer", "baseline_trainer")
    if args.peers:
        timed("peer_lora", "peer_lora")
        timed("peer_setfit_head", "peer_setfit_head")
    if not args.quick:
        # the two tricks apart: caching without length grouping, and the Trainer with its own length grouping
        timed("ours_train_ungrouped", "ours_train", replace(cfg, group_by_length=False, run_name=f"ours-{shape}-ungrouped"))
        timed("baseline_trainer_grouped", "baseline_trainer", grouped=True)
        timed("profile", "profile")
    return _ratios(r, args)


def _ratios(r: dict, args) -> dict:
    a, b, ours, lim = r["baseline_trainer"], r["baseline_loop"], r["ours_train"], r["limit"]
    pre = r["ours_precompute"]["precompute_s"]
    n = 8
    r["ratios"] = {
        "epoch_speedup_vs_A": a["epoch_s"] / ours["epoch_s"],
        "epoch_speedup_vs_B": b["epoch_s"] / ours["epoch_s"],
        "ours_vs_limit": ours["epoch_s"] / lim["epoch_s"],
        "precompute_vs_plain_forward": r["ours_precompute"]["loop_tokens_per_s"] / r["bottom_forward"]["tokens_per_s"],
        "cache_size_vs_fp16_states": r["ours_precompute"]["cache_vs_fp16_states"],
        "train_peak_rss_vs_A": ours["peak_rss_mb"] / a["peak_rss_mb"],
        "train_rss_growth_vs_A": (ours["peak_rss_mb"] - ours["rss_after_imports_mb"])
        / (a["peak_rss_mb"] - a["rss_after_imports_mb"]),
        "break_even_epochs_vs_B": (math.floor(pre / (b["epoch_s"] - ours["epoch_s"])) + 1
                                   if b["epoch_s"] > ours["epoch_s"] else None),
        "sweep8_cost_ratio_B_over_ours": n * b["epoch_s"] / (pre + n * ours["epoch_s"]),
        "sweep8_cost_ratio_A_over_ours": n * a["epoch_s"] / (pre + n * ours["epoch_s"]),
        "accuracy_diff_vs_A_points": 100 * (ours["accuracy"] - a["accuracy"]),
    }
    for peer in ("peer_lora", "peer_setfit_head"):
        if peer in r:
            r["ratios"][f"epoch_speedup_vs_{peer[5:]}"] = r[peer]["epoch_s"] / ours["epoch_s"]
            r["ratios"][f"accuracy_diff_vs_{peer[5:]}_points"] = 100 * (ours["accuracy"] - r[peer]["accuracy"])
            r["ratios"][f"train_rss_growth_vs_{peer[5:]}"] = (ours["peak_rss_mb"] - ours["rss_after_imports_mb"]) / (
                r[peer]["peak_rss_mb"] - r[peer]["rss_after_imports_mb"])
    if "ours_train_ungrouped" in r:
        r["ratios"]["epoch_speedup_vs_A_without_grouping"] = a["epoch_s"] / r["ours_train_ungrouped"]["epoch_s"]
        r["ratios"]["epoch_speedup_vs_A_both_grouped"] = (r["baseline_trainer_grouped"]["epoch_s"]
                                                          / ours["epoch_s"])
    return r


def markdown(results: list, meta: dict) -> str:
    lines = [f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; command: `{meta['command']}`", ""]
    for r in results:
        pre = r["ours_precompute"]
        lines += [f"### {r['shape']} ({r['model']}, k={r['k']} frozen; {pre['examples']} examples, "
                  f"{pre['tokens']} tokens incl. validation/test)", "",
                  "| method | precompute s | s/epoch | tokens/s | peak RSS MiB | accuracy | F1 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        rows = [("A: HF Trainer, frozen full model", None, r["baseline_trainer"]),
                ("B: plain loop, frozen full model", None, r["baseline_loop"]),
                ("ours: precompute + train from cache", pre["precompute_s"], r["ours_train"]),
                ("limit: top fwd+bwd, batches in memory", None, r["limit"])]
        if "peer_lora" in r:
            rows += [(f"peer: LoRA r={r['peer_lora']['r']} on q,k,v of every layer (peft), lr "
                      f"{r['peer_lora']['lr']:g}", None, r["peer_lora"]),
                     (f"peer: SetFit-style head on the frozen body, lr {r['peer_setfit_head']['lr']:g}", None,
                      r["peer_setfit_head"])]
        if "ours_train_ungrouped" in r:
            rows += [("A + Trainer length grouping", None, r["baseline_trainer_grouped"]),
                     ("ours without length grouping", None, r["ours_train_ungrouped"])]
        for name, p, m in rows:
            acc = f"{m['accuracy']:.4f}" if "accuracy" in m else "-"
            f1 = f"{m['f1']:.4f}" if "f1" in m else "-"
            cuda = f" (CUDA {m['cuda_peak_mb']:.0f})" if "cuda_peak_mb" in m else ""
            lines.append(f"| {name} | {p and f'{p:.1f}' or '-'} | {m['epoch_s']:.2f} | {m['tokens_per_s']:.0f} | "
                         f"{m['peak_rss_mb']:.0f}{cuda} | {acc} | {f1} |")
        bf = r["bottom_forward"]
        lines += ["", f"Plain bottom forward: {bf['tokens_per_s']:.0f} tok/s; precompute loop (tokenize + forward + "
                      f"HDF5 write): {pre['loop_tokens_per_s']:.0f} tok/s; cache {pre['cache_bytes'] / 2**20:.1f} MiB.",
                  "", "| ratio | value |", "| --- | --- |"]
        for k, v in r["ratios"].items():
            lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
        if "profile" in r:
            lines += ["", "Profile of ours' training step (ms per step, share):", "",
                      "| data path | I/O | collate | forward | backward | optimizer |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for mode, p in r["profile"].items():
                if not isinstance(p, dict):  # peak_rss_mb etc. of the profiling process
                    continue
                lines.append(f"| {mode} | " + " | ".join(f"{p[k]['ms_per_step']:.1f} ({100 * p[k]['share']:.0f}%)"
                                                         for k in p) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("minilm", "bert-base", "both"), default="both")
    ap.add_argument("--samples", type=int, default=1000, help="training examples (validation/test add 10%% each)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    ap.add_argument("--no-group-by-length", action="store_true", help="ours without length-grouped batches")
    ap.add_argument("--repeats", type=int, default=2, help="alternated repeats of precompute vs plain forward")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="also the peers: LoRA (peft) on the full model and a SetFit-style head on the frozen body")
    ap.add_argument("--quick", action="store_true", help="tiny run that checks the benchmark works (no profile)")
    ap.add_argument("--out", default=os.path.join(ROOT, "cache", "bench"))
    ap.add_argument("--workdir", help="where caches/models go (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.repeats = min(args.samples, 48), 1
    shapes = ("minilm", "bert-base") if args.shape == "both" else (args.shape,)
    import torch

    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU only"),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        results = [bench_shape(s, args, workdir) for s in shapes]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump({"meta": meta, "args": vars(args), "results": results}, fh, indent=2)
    md = markdown(results, meta)
    with open(os.path.join(args.out, "bench.md"), "w") as fh:
        fh.write(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
