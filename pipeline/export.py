"""Export a trained run as one standard Hugging Face model folder, and classify raw texts with it.

The merged model is the base checkpoint's *ForSequenceClassification model (so embeddings and layers [0, k) are
exactly the frozen weights the cache was built from) with layers [k, L), pooler and head taken from the run's
top.safetensors. `AutoModelForSequenceClassification.from_pretrained(folder)` loads it; no code of this project
is needed to use it."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .config import Config
from .errors import PipelineError
from .rundir import CONFIG, TOP, RunDir, readable_mode
from .model import carry_over, frozen_weights_sha256, load_full_model, load_tokenizer, safetensors_files


def merged_model(run_dir: str):
    """(full model with the run's trained top, tokenizer, config of the run)."""
    run = RunDir(run_dir)
    top_file = run.file(TOP)
    if not os.path.isfile(top_file):
        raise PipelineError(f"{run_dir} holds no finished run (no top.safetensors); train it first (or finish it with "
                            f"`train --resume --run-name {run.name}`).")
    saved = run.read_json(CONFIG)
    with safe_open(top_file, "pt") as st:
        meta = st.metadata()
    k = int(meta["k"])
    cfg = replace(Config.from_dict(saved["config"]), k=k, stages="", depths="")
    label_names = json.loads(meta["label_names_json"])
    full = load_full_model(cfg, len(label_names) if label_names else 1, label_names)
    digest = frozen_weights_sha256(cfg, None if safetensors_files(cfg) else full.base_model)
    built = json.loads(saved["cache_attrs"]["weights_sha256_json"]).get(str(k))
    if digest != built:
        raise PipelineError(f"the frozen weights of {cfg.model!r} changed since {run_dir} was trained; the top "
                            f"would sit on other layers. Export from the model the run was trained with.")
    carry_over(load_file(top_file), full, shift=k)
    tokenizer = load_tokenizer(cfg)
    tokenizer.model_max_length = cfg.max_length  # predict truncates like training did
    # what predict needs to feed the model like training did; kept in the exported config.json
    full.config.frozen_top = {"k": k, "text_pair_column": cfg.text_pair_column, "max_length": cfg.max_length,
                              "task": cfg.task}
    return full.eval(), tokenizer, cfg


def export(run_dir: str, out: str | None = None) -> str:
    out = out or os.path.join(run_dir, "export")
    model, tokenizer, cfg = merged_model(run_dir)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    for name in os.listdir(out):  # transformers writes the weights 0600; make them readable like the rest
        if os.path.isfile(os.path.join(out, name)):
            os.chmod(os.path.join(out, name), readable_mode())
    print(f"exported {run_dir} -> {out} ({cfg.model} with its top {model.config.num_hidden_layers - cfg.k} layers "
          f"+ head from the run; load it with AutoModelForSequenceClassification.from_pretrained({out!r}))")
    return out


def load_for_predict(path: str):
    """An exported folder or a run directory (merged in memory)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if os.path.isfile(os.path.join(path, "top.safetensors")):
        model, tokenizer, _ = merged_model(path)
        return model, tokenizer
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise PipelineError(f"{path!r} is neither a run directory (top.safetensors) nor an exported model folder "
                            f"(config.json); pass one of those with --model-dir.")
    model = AutoModelForSequenceClassification.from_pretrained(path)  # trust_remote_code stays off
    return model.eval(), AutoTokenizer.from_pretrained(path)


def predict(path: str, texts: list, pairs: list | None = None, batch_size: int = 32) -> list:
    """[(label name, probability) or (value,), ...]: the predicted class and its softmax probability, or the
    regression value. A model trained on text pairs needs `pairs` (one per text); one trained on single texts
    refuses them."""
    model, tokenizer = load_for_predict(path)
    trained = getattr(model.config, "frozen_top", None) or {}
    pair_column = trained.get("text_pair_column")
    if pair_column and pairs is None:
        raise PipelineError(f"this model was trained on text pairs (second text from {pair_column!r}): give each "
                            f"text its pair with --text-pair, or --file with two tab-separated columns.")
    if pairs is not None and trained and not pair_column:
        raise PipelineError("this model was trained on single texts, not pairs: drop --text-pair / the second "
                            "column of --file.")
    if pairs is not None and len(pairs) != len(texts):
        raise PipelineError(f"{len(texts)} texts but {len(pairs)} pairs: give one --text-pair per text.")
    id2label = model.config.id2label
    regression = model.config.problem_type == "regression" or model.config.num_labels == 1
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            second = pairs[i:i + batch_size] if pairs is not None else None
            enc = tokenizer(texts[i:i + batch_size], second, truncation=True, padding=True, return_tensors="pt")
            logits = model(**enc).logits
            if regression:
                out += [(float(v),) for v in logits.squeeze(-1)]
            else:
                probs = logits.softmax(-1)
                score, idx = probs.max(-1)
                out += [(id2label[int(j)], float(p)) for j, p in zip(idx, score)]
    return out


def read_texts(args_texts: list, file: str | None, text_pairs: list | None = None) -> tuple[list, list | None]:
    """(texts, pairs or None) from the arguments (--text-pair: one per text), --file (one per line; a pair per line
    as two tab-separated columns) or stdin (like --file)."""
    if args_texts:
        return list(args_texts), list(text_pairs) if text_pairs else None
    if text_pairs:
        raise PipelineError("--text-pair goes with texts given as arguments; in --file or on stdin put the pair in a "
                            "second tab-separated column.")
    if file:
        try:
            with open(file, encoding="utf-8") as fh:
                lines = [line.rstrip("\n") for line in fh if line.strip()]
        except OSError as e:
            raise PipelineError(f"cannot read --file {file!r}: {e.strerror}") from None
    elif sys.stdin.isatty():
        raise PipelineError("no texts: pass them as arguments, with --file (one per line), or on stdin.")
    else:
        lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    split = [line.split("\t") for line in lines]
    widths = {len(parts) for parts in split}
    if widths == {2}:
        return [a for a, _ in split], [b for _, b in split]
    if widths == {1}:
        return lines, None
    raise PipelineError(f"the input lines have {sorted(widths)} tab-separated columns: use one text per line, or "
                        f"two tab-separated columns (text, pair) on every line.")
