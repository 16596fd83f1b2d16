"""Check exactness on real cached examples: full model on token ids vs top model on cached layer-k states."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import h5py
import numpy as np
import torch
from accelerate.utils import set_seed

from .cache import check_cache, open_cache, pad_index, read_attrs, read_examples
from .config import Config
from .errors import PipelineError
from .model import (check_frozen_weights, frozen_weights_sha256, input_dtype, load_full_model, load_tokenizer,
                    record_states, safetensors_files, split_top)


def verify(cfg: Config, cache_path: str | None = None, samples: int = 64, split: str = "validation",
           batch_size: int = 16) -> dict:
    path = cache_path or cfg.cache_path()
    info = open_cache(path, cfg)
    set_seed(cfg.seed)
    full = load_full_model(cfg, info.num_labels, info.label_names).eval()
    top = split_top(copy.deepcopy(full), cfg.k).eval()
    tokenizer = load_tokenizer(cfg)
    n = info.splits[split]
    picks = np.unique(np.linspace(0, n - 1, min(samples, n)).round().astype(int))
    rows = read_examples(path, split, picks, cfg.k)
    # storage rounding: half an ulp of the cache dtype, plus float32 noise from another batch composition
    rtol, atol = {"float16": (2.0 ** -10, 1e-4), "bfloat16": (2.0 ** -7, 1e-4)}.get(info.attrs["dtype"], (1e-5, 1e-5))
    dtype = input_dtype(top)
    max_logit, max_hidden, excess = 0.0, 0.0, 0.0
    with torch.inference_mode():
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            enc = tokenizer.pad({key: [ex[key] for ex, _ in chunk] for key in chunk[0][0]}, return_tensors="pt")
            with record_states(full.base_model, [cfg.k]) as states:  # the full model's state at depth k
                out = full(**enc)
            # the cache is right-padded; the tokenizer may pad on the left (decoders): compare real tokens only
            mask = enc["attention_mask"].bool()
            lengths = mask.sum(-1)
            right = torch.arange(mask.shape[1])[None, :] < lengths[:, None]
            sizes = np.asarray([len(h) for _, h in chunk])
            index, _ = pad_index(np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
            hidden = torch.cat([h for _, h in chunk])[torch.from_numpy(index)] * right[..., None]  # cache layout
            ref, got = states[cfg.k].float()[mask], hidden[right]
            max_hidden = max(max_hidden, float((ref - got).abs().max()))
            excess = max(excess, float(((ref - got).abs() - atol - rtol * ref.abs()).max()))
            logits = top(inputs_embeds=hidden.to(dtype), attention_mask=right.long()).logits
            if logits.dim() == 3:  # per-token logits: the real tokens of each side's padding
                ref_logits, logits = out.logits[mask], logits[right]
            else:
                ref_logits = out.logits
            max_logit = max(max_logit, float((ref_logits - logits).abs().max()))
    print(f"verified {len(rows)} {split} examples of {path} (cache dtype {info.attrs['dtype']}, k={cfg.k})")
    print(f"max_abs_hidden_diff={max_hidden:.3g}")
    print(f"max_abs_logit_diff={max_logit:.3g}")
    return {"max_abs_logit_diff": max_logit, "max_abs_hidden_diff": max_hidden, "examples": len(rows),
            "hidden_within_tolerance": excess <= 0, "tolerance": f"|diff| <= {atol:g} + {rtol:g}*|value|"}


def check(cfg: Config, cache_path: str | None = None, recompute: int = 0) -> None:
    """`python -m pipeline check`: the file checks of cache.check_cache, then optionally recompute `recompute`
    validation rows from their stored token ids with the model the cache names and compare."""
    path = cache_path or cfg.cache_path()
    ok, problems = check_cache(path)
    for line in ok:
        print(f"ok    {line}")
    if not problems and recompute > 0:
        with h5py.File(path, "r") as f:
            attrs = read_attrs(f)
        built = Config.from_dict(json.loads(attrs["config_json"]))  # plain JSON, never executed
        hashes = json.loads(attrs["weights_sha256_json"])
        for d in json.loads(attrs["depths_json"]):
            at = replace(built, k=d)
            base = None if safetensors_files(at) else load_full_model(at, int(attrs["num_labels"])).base_model
            try:
                check_frozen_weights(frozen_weights_sha256(at, base), hashes[str(d)], built, d, "the cache",
                                     "(sha256 differs)")
            except PipelineError as e:
                problems.append(str(e))
            del base
            r = verify(at, path, samples=recompute)
            if r["hidden_within_tolerance"]:
                print(f"ok    depth {d}: {r['examples']} recomputed rows match the cache ({r['tolerance']})")
            else:
                problems.append(f"depth {d}: recomputed rows differ from the cache beyond {r['tolerance']} "
                                f"(max abs diff {r['max_abs_hidden_diff']:.3g}): the model or the file changed")
    if problems:
        for line in problems:
            print(f"FAIL  {line}")
        raise PipelineError(f"cache {path} failed {len(problems)} check(s):\n  " + "\n  ".join(problems) +
                            "\nRebuild it with `make precompute ARGS=--force` (with the options that built it).")
    print(f"cache {path} passed all checks")
