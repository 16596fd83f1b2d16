"""Fine-tune the top encoder layers + head on cached hidden states with an explicit Accelerate loop."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import save_file
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from .cache import CachedSplit, collate, open_cache
from .config import Config
from .errors import PipelineError
from .model import load_top


def compute_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict:
    if task == "regression":
        pearson = float(pearsonr(preds, labels)[0]) if len(preds) > 1 and np.std(preds) > 0 else float("nan")
        return {"mse": float(mean_squared_error(labels, preds)), "pearson": pearson}
    return {"accuracy": float(accuracy_score(labels, preds)),
            "f1": float(f1_score(labels, preds, average="macro"))}


def make_loader(ds: CachedSplit, cfg: Config, train: bool, pin: bool, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(collate_fn=collate, num_workers=cfg.num_workers, pin_memory=pin,
                  persistent_workers=cfg.num_workers > 0)
    if not train:
        return DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, **kwargs)
    if cfg.group_by_length:
        sampler = LengthGroupedSampler(cfg.batch_size, lengths=ds.lengths.tolist(), generator=g)
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, **kwargs)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, generator=g, **kwargs)


def build_optimizer(model, cfg: Config, total_steps: int):
    """AdamW (no weight decay on biases and LayerNorm weights) + linear warmup/decay over total_steps."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0}], lr=cfg.lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


def evaluate(model, loader, accelerator, task) -> dict:
    model.eval()
    preds, refs = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(inputs_embeds=batch["inputs_embeds"].float(), attention_mask=batch["attention_mask"]).logits
            p = logits.squeeze(-1) if task == "regression" else logits.argmax(-1)
            p, y = accelerator.gather_for_metrics((p, batch["labels"]))
            preds.append(p.float().cpu().numpy() if task == "regression" else p.cpu().numpy())
            refs.append(y.cpu().numpy())
    model.train()
    return compute_metrics(task, np.concatenate(preds), np.concatenate(refs))


def train(cfg: Config, cache_path: str | None = None) -> dict:
    path = cache_path or cfg.cache_path()
    info = open_cache(path, cfg)
    if "train" not in info.splits or "validation" not in info.splits:
        raise PipelineError(f"cache {path} lacks a train or validation split; rebuild it with `make precompute`.")
    # Launched as several processes (torchrun / accelerate launch) on a machine without CUDA: Accelerate only picks
    # its gloo CPU backend when told cpu=True; otherwise each process would silently train alone.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # Several runs in one process (tests, sweeps) may differ in mixed precision: Accelerate keeps that in a
    # singleton, so start each run from a fresh one (the process group, kept in PartialState, stays).
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=cfg.cpu or multi_cpu, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum)
    set_seed(cfg.seed)  # before building the top: a fresh classification head is drawn from this RNG
    model, digest = load_top(cfg, info.num_labels, info.label_names)
    if digest != info.weights_sha256:
        raise PipelineError(
            f"the frozen weights of {cfg.model!r} (layers 0..{cfg.k - 1} + embeddings) differ from those that built "
            f"{path}; the model changed since precompute. Rebuild with `make precompute ARGS=--force`."
        )
    train_ds = CachedSplit(path, "train", cfg.k, cfg.in_memory)
    val_ds = CachedSplit(path, "validation", cfg.k, cfg.in_memory)
    pin = accelerator.device.type == "cuda"
    train_dl = make_loader(train_ds, cfg, True, pin, cfg.seed)
    val_dl = make_loader(val_ds, cfg, False, pin, cfg.seed)

    steps_per_epoch = math.ceil(len(train_dl) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps <= 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, val_dl, scheduler)

    run_dir = os.path.join(cfg.runs_dir, cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as fh:
            json.dump({"config": cfg.to_dict(), "cache": path, "cache_attrs": {
                k: info.attrs[k] for k in ("weights_sha256", "dataset_fingerprint", "k", "dtype", "num_layers")},
                "label_names": info.label_names, "trainable_params": n_trainable,
                "num_processes": accelerator.num_processes, "device": str(accelerator.device)}, fh, indent=2, default=str)
        open(os.path.join(run_dir, "metrics.jsonl"), "w").close()
    accelerator.print(f"train: {len(train_ds)} train / {len(val_ds)} validation examples from {path}; "
                      f"top {info.num_layers - cfg.k} of {info.num_layers} layers + head, {n_trainable / 1e6:.2f}M "
                      f"trainable params, {accelerator.num_processes} process(es) on {accelerator.device}")

    step, metrics = 0, {}
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        t0, tokens, loss_sum, n_batches = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(train_dl, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15, disable=not accelerator.is_local_main_process)
        for batch in bar:
            with accelerator.accumulate(model):
                out = model(inputs_embeds=batch["inputs_embeds"].float(), attention_mask=batch["attention_mask"],
                            labels=batch["labels"])
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            loss_sum += out.loss.item()
            n_batches += 1
            bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}",
                            refresh=False)
            if cfg.max_steps > 0 and step >= cfg.max_steps:
                break
        secs = time.perf_counter() - t0
        metrics = evaluate(model, val_dl, accelerator, cfg.task)
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(n_batches, 1), "train_seconds": secs,
                  "train_tokens_per_s": tokens / secs, **{f"val_{k}": v for k, v in metrics.items()}}
        accelerator.print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if accelerator.is_main_process:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if cfg.max_steps > 0 and step >= cfg.max_steps:
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        top = accelerator.unwrap_model(model)
        state = {n: t.detach().cpu().contiguous() for n, t in top.state_dict().items()}
        save_file(state, os.path.join(run_dir, "top.safetensors"),
                  metadata={"config_json": cfg.to_json(), "k": str(cfg.k), "num_layers": str(info.num_layers),
                            "label_names_json": json.dumps(info.label_names), "cache": path})
        top.config.to_json_file(os.path.join(run_dir, "top_config.json"))
    final = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    accelerator.print(f"run dir: {run_dir}")
    accelerator.print(final)
    return {"run_dir": run_dir, **metrics}
