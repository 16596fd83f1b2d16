"""Check exactness on real cached examples: full model on token ids vs top model on cached layer-k states."""
from __future__ import annotations

import copy

import h5py
import numpy as np
import torch
from accelerate.utils import set_seed

from .cache import open_cache
from .config import Config
from .model import load_full_model, load_tokenizer, split_top


def verify(cfg: Config, cache_path: str | None = None, samples: int = 64, split: str = "validation",
           batch_size: int = 16) -> dict:
    path = cache_path or cfg.cache_path()
    info = open_cache(path, cfg)
    set_seed(cfg.seed)
    full = load_full_model(cfg, info.num_labels, info.label_names).eval()
    top = split_top(copy.deepcopy(full), cfg.k).eval()
    tokenizer = load_tokenizer(cfg)
    with h5py.File(path, "r") as f:
        g = f[split]
        offsets = g["offsets"][:]
        n = len(offsets) - 1
        picks = np.unique(np.linspace(0, n - 1, min(samples, n)).round().astype(int))
        rows = []
        for i in picks:
            s, e = offsets[i], offsets[i + 1]
            ex = {"input_ids": g["input_ids"][s:e].astype(np.int64).tolist()}
            if "token_type_ids" in g:
                ex["token_type_ids"] = g["token_type_ids"][s:e].astype(np.int64).tolist()
            rows.append((ex, torch.from_numpy(g[f"layer_{cfg.k}/hidden"][s:e].astype(np.float32))))
    max_logit, max_hidden = 0.0, 0.0
    with torch.inference_mode():
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            enc = tokenizer.pad({key: [ex[key] for ex, _ in chunk] for key in chunk[0][0]}, return_tensors="pt")
            out = full(**enc, output_hidden_states=True)
            hidden = torch.nn.utils.rnn.pad_sequence([h for _, h in chunk], batch_first=True)
            mask = enc["attention_mask"].bool()
            max_hidden = max(max_hidden, float((out.hidden_states[cfg.k][mask] - hidden[mask]).abs().max()))
            logits = top(inputs_embeds=hidden, attention_mask=enc["attention_mask"]).logits
            max_logit = max(max_logit, float((out.logits - logits).abs().max()))
    print(f"verified {len(rows)} {split} examples of {path} (cache dtype {info.attrs['dtype']}, k={cfg.k})")
    print(f"max_abs_hidden_diff={max_hidden:.3g}")
    print(f"max_abs_logit_diff={max_logit:.3g}")
    return {"max_abs_logit_diff": max_logit, "max_abs_hidden_diff": max_hidden, "examples": len(rows)}
