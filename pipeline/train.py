"""Fine-tune the top encoder layers + head on cached hidden states with an explicit Accelerate loop."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import save_file
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .cache import Batches, CachedSplit, open_cache, single_batch
from .config import Config
from .dist import process_state, share
from .errors import PipelineError, first_line
from .fsutil import ensure_writable_dir
from .memory import release_heap
from .model import LAYER_KEY, carry_over, load_top


def compute_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict:
    if task == "regression":
        pearson = float(pearsonr(preds, labels)[0]) if len(preds) > 1 and np.std(preds) > 0 else float("nan")
        return {"mse": float(mean_squared_error(labels, preds)), "pearson": pearson}
    return {"accuracy": float(accuracy_score(labels, preds)),
            "f1": float(f1_score(labels, preds, average="macro"))}


def make_loader(ds: CachedSplit, cfg: Config, train: bool, pin: bool, g: torch.Generator) -> DataLoader:
    """Whole batches gathered by the dataset (one vectorised read each); g drives the shuffling and the DataLoader's
    worker seeds (never the global RNG). Accelerate splits each batch across processes (split_batches)."""
    batches = Batches(ds.lengths, cfg.batch_size if train else cfg.eval_batch_size, shuffle=train,
                      grouped=cfg.group_by_length, generator=g)
    return DataLoader(ds, batch_sampler=batches, collate_fn=single_batch, num_workers=cfg.num_workers,
                      pin_memory=pin, persistent_workers=cfg.num_workers > 0, generator=g)


def epoch_seed(cfg: Config, epoch: int) -> int:
    """Seed of an epoch's batch order: a pure function of (seed, epoch), so a resumed run rebuilds it."""
    return cfg.seed * 1000 + epoch


def build_optimizer(model, cfg: Config, total_steps: int, depth: int | None = None, num_layers: int | None = None):
    """AdamW (no weight decay on biases and LayerNorm weights) + linear warmup/decay over total_steps. With
    cfg.layer_lr_decay < 1 (discriminative lr), top layer i (original layer depth + i) gets
    lr * decay^(num_layers - depth - i); pooler and head get lr."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight")
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = LAYER_KEY.match(n)
        scale = 1.0
        if m and cfg.layer_lr_decay != 1.0:
            scale = cfg.layer_lr_decay ** (num_layers - depth - int(m.group(2)))
        wd = 0.0 if n.endswith(no_decay) else cfg.weight_decay
        groups.setdefault((scale, wd), []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": cfg.lr * scale, "weight_decay": wd}
                                   for (scale, wd), ps in sorted(groups.items(), reverse=True)], lr=cfg.lr)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)


def evaluate(model, loader, accelerator, task) -> dict:
    """Metrics over exactly the split's examples from every process (gather_for_metrics drops the duplicates that
    even out the last batch); predictions stay on the device until the end."""
    model.eval()
    preds, refs = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(inputs_embeds=batch["inputs_embeds"].float(), attention_mask=batch["attention_mask"]).logits
            p = logits.squeeze(-1).float() if task == "regression" else logits.argmax(-1)
            p, y = accelerator.gather_for_metrics((p, batch["labels"]))
            preds.append(p)
            refs.append(y)
            if len(preds) % LOG_EVERY == 0:
                release_heap()
    model.train()
    return compute_metrics(task, torch.cat(preds).cpu().numpy(), torch.cat(refs).cpu().numpy())


# Config fields that may differ when a run is resumed: they do not change what is computed.
RESUME_MAY_DIFFER = ("num_workers", "in_memory", "cpu", "runs_dir", "checkpoint_every")


def latest_checkpoint(run_dir: str) -> tuple[str, dict] | None:
    """The newest complete checkpoint of a run (trainer_state.json is written after Accelerate's save_state has
    finished, so a checkpoint cut short by a kill is never picked) and its trainer state."""
    root = os.path.join(run_dir, "checkpoints")
    for name in sorted(os.listdir(root) if os.path.isdir(root) else [], reverse=True):
        state_file = os.path.join(root, name, "trainer_state.json")
        if os.path.isfile(state_file):
            with open(state_file) as fh:
                return os.path.join(root, name), json.load(fh)
    return None


def _prepare_run_dir(cfg: Config, run_dir: str, resume: bool):
    """Fresh runs get a new directory; --resume continues one with the same config. Returns (checkpoint, state)
    to resume from, (None, None) for a fresh start, or (None, results) for a run that has already finished."""
    config_file = os.path.join(run_dir, "config.json")
    if not resume:
        if os.path.exists(config_file):
            raise PipelineError(
                f"run directory {run_dir} already holds a run; continue it with `--resume --run-name "
                f"{os.path.basename(run_dir)}`, or choose another --run-name (nothing is overwritten).")
        return None, None
    if not cfg.run_name:
        raise PipelineError("--resume needs --run-name: the name of the run directory to continue.")
    if not os.path.exists(config_file):
        raise PipelineError(f"--resume: {run_dir} holds no run to continue (no config.json); drop --resume to start "
                            f"it fresh.")
    with open(config_file) as fh:
        saved = json.load(fh)["config"]
    now = cfg.to_dict()
    diff = [f"{k}: run has {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k]]
    if diff:
        raise PipelineError(f"--resume: the run in {run_dir} was started with another config:\n  " +
                            "\n  ".join(diff) + "\nResume with the original options, or start a new --run-name.")
    results = os.path.join(run_dir, "results.json")
    if os.path.exists(results):
        with open(results) as fh:
            return None, json.load(fh)
    found = latest_checkpoint(run_dir)
    return (found[0], found[1]) if found else (None, None)


def _epoch_start(epoch: int, step: int, metrics: dict) -> dict:
    """Trainer state at the start of an epoch (nothing of it done yet), as checkpointed and resumed."""
    return {"epoch": epoch, "step": step, "batches_done": 0, "loss_sum": 0.0, "tokens": 0, "seconds": 0.0,
            "metrics": metrics}


def save_checkpoint(accelerator, run_dir: str, state: dict) -> None:
    """Accelerate save_state (model as safetensors, optimizer, scheduler, RNG of every process) + our position in
    the data as JSON, written last; older checkpoints are removed once the new one is complete."""
    root = os.path.join(run_dir, "checkpoints")
    path = os.path.join(root, f"step_{state['step']:08d}_epoch_{state['epoch']:03d}_{state['batches_done']:06d}")
    accelerator.save_state(path, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = os.path.join(path, "trainer_state.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, os.path.join(path, "trainer_state.json"))
        for name in os.listdir(root):
            if os.path.join(root, name) != path:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    accelerator.wait_for_everyone()


def _tracker_config(cfg: Config) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}


def _check_tracker(name: str) -> None:
    from accelerate.tracking import get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    if name not in available:
        raise PipelineError(f"--report-to {name}: that tracker is not installed here (available: "
                            f"{', '.join(available) or 'none'}). For TensorBoard: pip install tensorboard.")


def train(cfg: Config, cache_path: str | None = None, resume: bool = False, shared: dict | None = None) -> dict:
    """Train the top on cached states. With cfg.stages, gradual unfreezing: one stage per depth, cfg.epochs each,
    every stage starting from the previous stage's weights. `shared` (sweeps) keeps loaded splits across runs."""
    path = cache_path or cfg.cache_path()
    info = open_cache(path, cfg)
    if "train" not in info.splits or "validation" not in info.splits:
        raise PipelineError(f"cache {path} lacks a train or validation split; rebuild it with `make precompute`.")
    if cfg.report_to != "none":
        _check_tracker(cfg.report_to)
    # Launched as several processes (torchrun / accelerate launch) on a machine without CUDA: Accelerate only picks
    # its gloo CPU backend when told cpu=True; otherwise each process would silently train alone.
    procs = process_state(cfg.cpu)
    if cfg.batch_size % procs.num_processes or cfg.eval_batch_size % procs.num_processes:
        raise PipelineError(f"--batch-size {cfg.batch_size} and --eval-batch-size {cfg.eval_batch_size} are global "
                            f"batches split across the {procs.num_processes} processes: make both multiples of "
                            f"{procs.num_processes}.")
    name = share(procs, cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))  # every process: the main one's timestamp
    run_dir = os.path.join(cfg.runs_dir, name)
    ckpt, state = _prepare_run_dir(cfg, run_dir, resume)
    if ckpt is None and state is not None:  # finished earlier
        print(f"run {run_dir} has already finished; its final metrics:")
        print(" ".join(f"{k}={v:.4f}" for k, v in state["metrics"].items()))
        return {"run_dir": run_dir, **state["metrics"]}
    ensure_writable_dir(run_dir, "run directory", "--runs-dir")  # every process: each fails alike, none hangs
    # Several runs in one process (tests, sweeps) may differ in mixed precision: Accelerate keeps that in a
    # singleton, so start each run from a fresh one (the process group, kept in PartialState, stays).
    AcceleratorState._reset_state()
    tracking = cfg.report_to != "none"
    accelerator = Accelerator(cpu=procs.device.type == "cpu", mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum, project_dir=run_dir,
                              log_with=cfg.report_to if tracking else None,
                              dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True))
    if tracking:
        accelerator.init_trackers(cfg.report_to, config=_tracker_config(cfg))
    stages = cfg.stage_depths()
    total_epochs = cfg.epochs * len(stages)  # cfg.epochs per stage
    metrics_file = os.path.join(run_dir, "metrics.jsonl")
    if state is None:
        state = _epoch_start(1, 0, {})
    set_seed(cfg.seed)  # before building the top: a fresh classification head is drawn from this RNG
    step, metrics, prev, n_trainable = state["step"], state["metrics"], None, 0
    for si in range((state["epoch"] - 1) // cfg.epochs, len(stages)):
        depth = stages[si]
        model, digest = load_top(replace(cfg, k=depth), info.num_labels, info.label_names)
        if digest != info.weights_sha256[depth]:
            raise PipelineError(
                f"the frozen weights of {cfg.model!r} (embeddings + layers below {depth}) differ from those that "
                f"built {path}; the model changed since precompute. Rebuild with `make precompute ARGS=--force`.")
        if prev is not None:
            carry_over(prev.state_dict(), model, stages[si - 1] - depth)
        train_ds = _split(shared, path, "train", depth, cfg.in_memory)
        val_ds = _split(shared, path, "validation", depth, cfg.in_memory)
        pin = accelerator.device.type == "cuda"
        # The shuffling generator is reseeded with (seed, epoch) at every epoch start, so the order of any epoch can
        # be rebuilt on resume; the loaders' own generators keep DataLoader seeding off the global RNG (dropout's).
        shuffle_gen = torch.Generator()
        train_dl = make_loader(train_ds, cfg, True, pin, shuffle_gen)
        val_dl = make_loader(val_ds, cfg, False, pin, torch.Generator())
        steps_per_epoch = math.ceil(len(train_dl) / cfg.grad_accum)
        total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps > 0:
            total_steps = min(cfg.max_steps, total_steps)
        optimizer, scheduler = build_optimizer(model, cfg, total_steps, depth, info.num_layers)
        accelerator.free_memory()  # forget the previous stage's prepared objects (save_state saves what is held)
        model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, val_dl,
                                                                            scheduler)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if ckpt is not None:
            try:  # Accelerate reads the model from safetensors and the rest with torch.load(weights_only=True)
                accelerator.load_state(ckpt)
            except Exception as e:  # an unpickling refusal, a damaged file
                raise PipelineError(
                    f"cannot load checkpoint {ckpt}: {first_line(e)}. Only plain tensors and numbers are accepted "
                    f"(no pickled code). Delete that checkpoint folder to resume from an earlier one, or start a "
                    f"new run.") from None
            accelerator.print(f"resuming {run_dir} from {ckpt}: epoch {state['epoch']}, step {state['step']}, "
                              f"{state['batches_done']} batches of the epoch done")
        if ckpt is None and si == 0:  # a fresh run
            if accelerator.is_main_process:
                with open(os.path.join(run_dir, "config.json"), "w") as fh:
                    json.dump({"config": cfg.to_dict(), "cache": path, "cache_attrs": {
                        k: info.attrs[k] for k in ("weights_sha256_json", "dataset_fingerprint", "depths_json",
                                                   "dtype", "num_layers")},
                        "label_names": info.label_names, "trainable_params": n_trainable, "stages": stages,
                        "num_processes": accelerator.num_processes, "device": str(accelerator.device)}, fh, indent=2,
                        default=str)
                open(metrics_file, "w").close()
        elif ckpt is not None:  # resumed: drop the records of epochs that are being redone
            if accelerator.is_main_process:
                records = [line for line in open(metrics_file) if json.loads(line)["epoch"] < state["epoch"]]
                with open(metrics_file, "w") as fh:
                    fh.writelines(records)
        elif cfg.checkpoint_every >= 0:  # a new stage: checkpoint the handed-over weights and the new optimizer
            save_checkpoint(accelerator, run_dir, _epoch_start(si * cfg.epochs + 1, step, metrics))
        ckpt = None
        what = (f"stage {si + 1}/{len(stages)}: " if len(stages) > 1 else "") + (
            f"top {info.num_layers - depth} of {info.num_layers} layers + head" if depth < info.num_layers
            else "head only (pooler + classifier)")
        accelerator.print(f"train: {len(train_ds)} train / {len(val_ds)} validation examples from {path}; {what}, "
                          f"{n_trainable / 1e6:.2f}M trainable params, {accelerator.num_processes} process(es) on "
                          f"{accelerator.device}")
        model.train()
        first = max(state["epoch"], si * cfg.epochs + 1)
        for epoch in range(first, (si + 1) * cfg.epochs + 1):
            shuffle_gen.manual_seed(epoch_seed(cfg, epoch))
            skip = state["batches_done"] if epoch == state["epoch"] else 0
            resumed = skip > 0
            t0 = time.perf_counter()
            tokens, loss_sum, n_batches, prior_s = ((state["tokens"], state["loss_sum"], skip, state["seconds"])
                                                    if resumed else (0, 0.0, 0, 0.0))
            totals = _Totals(accelerator, loss_sum, tokens)
            loader = accelerator.skip_first_batches(train_dl, skip) if resumed else train_dl
            bar = tqdm(loader, desc=f"epoch {epoch}/{total_epochs}", unit="batch", dynamic_ncols=True, initial=skip,
                       total=len(train_dl), mininterval=0.5 if sys.stderr.isatty() else 15,
                       disable=not accelerator.is_local_main_process)
            stage_done = False
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
                totals.add(out.loss, batch["attention_mask"])  # on the device: no host sync per step
                n_batches += 1
                if n_batches % LOG_EVERY == 0:
                    release_heap()
                    loss_sum, tokens = totals.read()
                    bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}",
                                    tok_s=f"{tokens / (time.perf_counter() - t0 + prior_s):.0f}", refresh=False)
                if accelerator.sync_gradients:
                    step += 1
                    stage_done = cfg.max_steps > 0 and step - si * total_steps >= cfg.max_steps
                    last = stage_done or n_batches == len(train_dl)
                    if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and not last:
                        loss_sum, tokens = totals.read()
                        save_checkpoint(accelerator, run_dir, {
                            "epoch": epoch, "step": step, "batches_done": n_batches, "loss_sum": loss_sum,
                            "tokens": tokens, "seconds": prior_s + time.perf_counter() - t0, "metrics": metrics})
                if stage_done:
                    break
            loss_sum, tokens = totals.read()
            secs = prior_s + time.perf_counter() - t0
            metrics = evaluate(model, val_dl, accelerator, cfg.task)
            record = {"epoch": epoch, "stage": si + 1, "depth": depth, "step": step,
                      "train_loss": loss_sum / max(n_batches, 1), "train_seconds": secs,
                      "train_tokens_per_s": tokens / secs, **{f"val_{k}": v for k, v in metrics.items()}}
            accelerator.print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in record.items()))
            if tracking:
                accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=step)
            if accelerator.is_main_process:
                with open(metrics_file, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if stage_done or epoch == (si + 1) * cfg.epochs:
                break  # the next stage (if any) checkpoints its own model once it is built
            if cfg.checkpoint_every >= 0:  # resume starts the next epoch
                save_checkpoint(accelerator, run_dir, _epoch_start(epoch + 1, step, metrics))
        prev = accelerator.unwrap_model(model)
        state = _epoch_start((si + 1) * cfg.epochs + 1, step, metrics)  # a resumed epoch's progress is used up

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_dict = {n: t.detach().cpu().contiguous() for n, t in prev.state_dict().items()}
        save_file(state_dict, os.path.join(run_dir, "top.safetensors"),
                  metadata={"config_json": cfg.to_json(), "k": str(stages[-1]), "num_layers": str(info.num_layers),
                            "label_names_json": json.dumps(info.label_names), "cache": path})
        prev.config.to_json_file(os.path.join(run_dir, "top_config.json"))
        records = [json.loads(line) for line in open(metrics_file)]
        with open(os.path.join(run_dir, "results.json"), "w") as fh:  # marks the run finished
            json.dump({"metrics": metrics, "step": step, "trainable_params": n_trainable, "k": stages[-1],
                       "train_seconds": sum(r["train_seconds"] for r in records)}, fh, indent=2)
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    if tracking:
        accelerator.end_training()
    final = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    accelerator.print(f"run dir: {run_dir}")
    accelerator.print(final)
    return {"run_dir": run_dir, **metrics}


LOG_EVERY = 50  # batches between reads of the running loss and token count (each read is a host sync)


class _Totals:
    """Running loss sum and token count of an epoch, accumulated on the device and read only when needed."""

    def __init__(self, accelerator, loss_sum: float, tokens: int):
        self.accelerator, self.loss0, self.tokens0 = accelerator, loss_sum, tokens
        self.loss = torch.zeros((), device=accelerator.device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=accelerator.device)

    def add(self, loss: torch.Tensor, mask: torch.Tensor) -> None:
        self.loss += loss.detach().float()
        self.tokens += mask.sum()

    def read(self) -> tuple[float, int]:
        """(this process's loss sum, tokens of every process); every process must call it at the same point."""
        tokens = self.accelerator.reduce(self.tokens.clone(), "sum")
        return self.loss0 + float(self.loss), self.tokens0 + int(tokens)


def _split(shared: dict | None, path: str, split: str, depth: int, in_memory: bool) -> CachedSplit:
    """The split's reader; sweeps (shared) keep one per split and depth: a map costs no memory, so this only saves
    reopening the file."""
    if shared is None:
        return CachedSplit(path, split, depth, in_memory, reuse_buffers=True)
    key = (os.path.abspath(path), split, depth, in_memory)
    if key not in shared:
        shared[key] = CachedSplit(path, split, depth, in_memory, reuse_buffers=True)
    return shared[key]
