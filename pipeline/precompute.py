"""Run the frozen embeddings + lower k layers once over the dataset and store the hidden states in HDF5."""
from __future__ import annotations

import json
import os
import sys
import platform
import time

import accelerate
import datasets
import h5py
import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from . import cache as C
from .config import Config
from .data import load_labeled
from .errors import PipelineError
from .model import frozen_weights_sha256, load_bottom, load_model_config, load_tokenizer, tokenizer_sha256


def library_versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


def precompute(cfg: Config, force: bool = False, device: str | None = None) -> str:
    out = cfg.cache_path()
    if os.path.exists(out) and not force:
        try:
            C.open_cache(out, cfg)
            print(f"cache {out} is up to date for this config; nothing to do (use --force to rebuild).")
            return out
        except PipelineError as e:
            raise PipelineError(f"{e}\n(existing file {out}; use --force to rebuild it)") from None
    t_start = time.perf_counter()
    _, mconf = load_model_config(cfg)  # fails fast on unknown model / unsupported architecture / bad k
    data = load_labeled(cfg)
    tokenizer = load_tokenizer(cfg)
    bottom = load_bottom(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"))
    bottom.to(device)
    dtype = np.dtype(cfg.cache_dtype)
    hidden_size = mconf.hidden_size

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = out + ".tmp"
    t0 = time.perf_counter()
    totals = {"examples": 0, "tokens": 0, "loop_seconds": 0.0}
    try:
        with h5py.File(tmp, "w") as f:
            a = f.attrs
            a["format_version"] = C.FORMAT_VERSION
            a["complete"] = False
            a["config_json"] = cfg.to_json()
            a["cache_key_json"] = json.dumps(cfg.cache_key(), sort_keys=True)
            a["model"] = cfg.model
            a["model_type"] = mconf.model_type
            a["num_layers"] = mconf.num_hidden_layers
            a["hidden_size"] = hidden_size
            a["k"] = cfg.k
            a["depths_json"] = json.dumps([cfg.k])
            a["dtype"] = cfg.cache_dtype
            a["weights_sha256"] = frozen_weights_sha256(cfg, bottom)
            a["tokenizer_json"] = json.dumps({
                "class": type(tokenizer).__name__, "name_or_path": cfg.model, "sha256": tokenizer_sha256(tokenizer),
                "max_length": cfg.max_length, "truncation": True, "padding": "none (ragged storage)",
                "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column})
            a["dataset_fingerprint"] = data.fingerprint
            a["num_labels"] = len(data.label_names) if data.label_names else 1
            a["label_names_json"] = json.dumps(data.label_names)
            a["task"] = cfg.task
            a["splits_json"] = json.dumps(list(data.splits))
            a["versions_json"] = json.dumps(library_versions())
            a["created_unix"] = time.time()
            bar = tqdm(total=sum(len(ix) for ix in data.splits.values()), desc=f"precompute k={cfg.k}",
                       unit="ex", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15)
            for split, idx in data.splits.items():
                t_split = time.perf_counter()
                n_tok = _write_split(f, split, idx, data, tokenizer, bottom, cfg, dtype, hidden_size, device, bar)
                totals["loop_seconds"] += time.perf_counter() - t_split
                totals["examples"] += len(idx)
                totals["tokens"] += n_tok
            bar.close()
            # loop_seconds: tokenize + bottom forward + HDF5 writes; seconds: also data and model loading
            a["stats_json"] = json.dumps({**totals, "seconds": time.perf_counter() - t_start, "device": str(device)})
            a["complete"] = True  # written last: a file without it is never used
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    secs = time.perf_counter() - t0
    size = os.path.getsize(out)
    print(f"precompute done: {totals['examples']} examples, {totals['tokens']} tokens, "
          f"{size / 2**20:.1f} MiB ({size / max(totals['tokens'], 1):.0f} B/token), {secs:.1f} s "
          f"({totals['examples'] / secs:.0f} ex/s, {totals['tokens'] / secs:.0f} tok/s) -> {out}")
    return out


def _write_split(f, split, idx, data, tokenizer, bottom, cfg, dtype, hidden_size, device, bar) -> int:
    texts = [data.texts[i] for i in idx]
    pairs = [data.pairs[i] for i in idx] if data.pairs is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
    lengths = np.fromiter((len(x) for x in enc["input_ids"]), dtype=np.int32, count=len(idx))
    order = np.argsort(lengths, kind="stable")  # similar lengths together: minimal padding, contiguous writes
    lengths = lengths[order]
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    g = f.create_group(split)
    g["offsets"] = offsets
    g["lengths"] = lengths
    g["labels"] = data.labels[idx][order]
    g["example_ids"] = idx[order].astype(np.int64)
    # token ids (for verify): uint16 where the vocabulary fits; token types only where a text pair makes them
    id_dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    g["input_ids"] = np.concatenate([np.asarray(enc["input_ids"][i], dtype=id_dtype) for i in order])
    has_tt = "token_type_ids" in enc
    if has_tt and any(any(t) for t in enc["token_type_ids"]):
        g["token_type_ids"] = np.concatenate([np.asarray(enc["token_type_ids"][i], dtype=np.int8) for i in order])
    hid = g.create_dataset(f"layer_{cfg.k}/hidden", shape=(total, hidden_size), dtype=dtype,
                           chunks=C.chunk_shape(total, hidden_size, dtype.itemsize))
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if has_tt else [])
    t0, done_tok = time.perf_counter(), 0
    bs = cfg.precompute_batch_size
    with torch.inference_mode():
        for start in range(0, len(order), bs):
            rows = order[start:start + bs]
            batch = tokenizer.pad({key: [enc[key][i] for i in rows] for key in keys if key != "attention_mask"},
                                  return_tensors="pt")
            batch = {key: v.to(device) for key, v in batch.items() if key in keys}
            h = bottom(**batch).last_hidden_state
            real = h[batch["attention_mask"].bool()]  # [sum(len), H], example after example
            lo, n = int(offsets[start]), real.shape[0]
            hid[lo:lo + n] = real.to("cpu", torch.float32).numpy().astype(dtype, copy=False)
            done_tok += n
            bar.update(len(rows))
            bar.set_postfix(split=split, tok_s=f"{done_tok / (time.perf_counter() - t0):.0f}", refresh=False)
    return total
