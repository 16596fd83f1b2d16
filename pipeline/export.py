"""Export a trained run as one standard Hugging Face model folder, and classify or tag raw texts with it.

The merged model is the base checkpoint's model with the task's head (*ForSequenceClassification,
*ForTokenClassification; so embeddings and layers [0, k) are exactly the frozen weights the cache was built from)
with layers [k, L), pooler and head taken from the run's top.safetensors. The task's Auto class loads it
(`AutoModelForTokenClassification.from_pretrained(folder)`, or `transformers.pipeline(...)`); no code of this
project is needed to use it."""
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
from .tasks import task_for
from .rundir import CONFIG, TOP, RunDir, readable_mode
from .model import (carry_over, check_frozen_weights, frozen_weights_sha256, load_full_model, load_tokenizer,
                    safetensors_files)


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
    check_frozen_weights(digest, built, cfg, k, f"the cache {run_dir} was trained from",
                         "Export from the model the run was trained with.")
    carry_over(load_file(top_file), full, shift=k)
    tokenizer = load_tokenizer(cfg)
    tokenizer.model_max_length = cfg.max_length  # predict truncates like training did
    # what predict needs to feed the model like training did; kept in the exported config.json
    thresholds = run.thresholds()
    full.config.frozen_top = {"k": k, "text_pair_column": cfg.text_pair_column, "max_length": cfg.max_length,
                              "task": cfg.task, **({"thresholds": thresholds} if thresholds else {})}
    return full.eval(), tokenizer, cfg


def export(run_dir: str, out: str | None = None) -> str:
    out = out or os.path.join(run_dir, "export")
    model, tokenizer, cfg = merged_model(run_dir)
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    _model_card(out, model, cfg)
    for name in os.listdir(out):  # transformers writes the weights 0600; make them readable like the rest
        if os.path.isfile(os.path.join(out, name)):
            os.chmod(os.path.join(out, name), readable_mode())
    print(f"exported {run_dir} -> {out} ({cfg.model} with its top {model.config.num_hidden_layers - cfg.k} layers "
          f"+ head from the run; load it with {task_for(cfg.task).head}.from_pretrained({out!r}))")
    return out


def _model_card(out: str, model, cfg: Config) -> None:
    """README.md of the exported folder: what it is, how to load it, and the decision thresholds if any."""
    task, info = task_for(cfg.task), model.config.frozen_top
    lines = [f"# {cfg.model}, top {model.config.num_hidden_layers - info['k']} layers fine-tuned ({cfg.task})", "",
             f"Layers [0, {info['k']}) and the embeddings are the frozen weights of `{cfg.model}`; the layers above "
             f"and the head were trained from a cache of layer {info['k']}'s states.", "",
             f"Load: `transformers.{task.head}.from_pretrained(folder)`, or "
             f"`transformers.pipeline(\"{'token-classification' if task.per_token else 'text-classification'}\", "
             f"model=folder)`. Labels: {', '.join(model.config.id2label.values())}."]
    if info.get("thresholds"):
        lines += ["", "Decision thresholds (a label is predicted when its sigmoid probability is at or over its "
                      "threshold; `config.json` keeps them under `frozen_top.thresholds`):", "",
                  "| label | threshold |", "| --- | --- |"]
        lines += [f"| {model.config.id2label[j]} | {t:g} |" for j, t in enumerate(info["thresholds"])]
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def load_for_predict(path: str):
    """An exported folder or a run directory (merged in memory)."""
    from transformers import AutoConfig, AutoTokenizer

    if os.path.isfile(os.path.join(path, "top.safetensors")):
        model, tokenizer, _ = merged_model(path)
        return model, tokenizer
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise PipelineError(f"{path!r} is neither a run directory (top.safetensors) nor an exported model folder "
                            f"(config.json); pass one of those with --model-dir.")
    task = (getattr(AutoConfig.from_pretrained(path), "frozen_top", None) or {}).get("task", "classification")
    model = task_for(task).head_class().from_pretrained(path)  # trust_remote_code stays off
    return model.eval(), AutoTokenizer.from_pretrained(path)


def predict(path: str, texts: list, pairs: list | None = None, batch_size: int = 32) -> tuple:
    """(the task, a result per text): (label name, probability) or (value,) for one label per text; every label at
    or over the run's threshold for multi-label; for a per-token task the text's words (split at whitespace) each
    with (word, tag, probability) from its first sub-token. A model trained on text pairs needs `pairs` (one per
    text); one trained on single texts refuses them."""
    model, tokenizer = load_for_predict(path)
    trained = getattr(model.config, "frozen_top", None) or {}
    task = task_for(trained.get("task") or {"regression": "regression", "multi_label_classification": "multi-label"}
                    .get(model.config.problem_type, "classification"))
    pair_column = trained.get("text_pair_column")
    if pair_column and pairs is None:
        raise PipelineError(f"this model was trained on text pairs (second text from {pair_column!r}): give each "
                            f"text its pair with --text-pair, or --file with two tab-separated columns.")
    if pairs is not None and (trained and not pair_column or task.per_token):
        raise PipelineError("this model was trained on single texts, not pairs: drop --text-pair / the second "
                            "column of --file.")
    if pairs is not None and len(pairs) != len(texts):
        raise PipelineError(f"{len(texts)} texts but {len(pairs)} pairs: give one --text-pair per text.")
    from .cache import pad_lists
    from .config import make_config

    # the task's own encode (precompute's tokenisation), with the columns this function names
    cfg = make_config(task=task.name, text_column="text", text_pair_column="pair" if pairs is not None else None,
                      max_length=int(trained.get("max_length") or min(tokenizer.model_max_length, 1 << 20)))
    pad, out = tokenizer.pad_token_id or 0, []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            batch = {"text": [t.split() for t in chunk] if task.per_token else chunk}
            if pairs is not None:
                batch["pair"] = pairs[i:i + batch_size]
            enc = task.encode(batch, tokenizer, cfg)
            padded = pad_lists(enc, {"input_ids": pad, "token_type_ids": 0})
            inputs = {n: torch.from_numpy(t) for n, t in padded.items()}
            shown = task.show(model(**inputs).logits, model.config.id2label, trained)
            if task.per_token:
                shown = [task.words(batch["text"][j], enc["word_ids"][j], shown[j]) for j in range(len(chunk))]
            out += shown
    return task, out


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
