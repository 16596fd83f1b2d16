"""One object per --task: everything that differs between tasks, and nothing else.

A task says
- how its labels are read from the cleaned rows and checked (read_labels), and whether the split is stratified;
- how text becomes tokens (encode: the one tokenisation of precompute, evaluate and predict) and which target
  arrays the cache stores: one per example (`labels`) or one per token (`token_labels`, beside the `word_ids`
  that map tokens back to words);
- the head: the transformers Auto class, `problem_type` and the config fields of the labels (head_config);
- one loss (training; evaluation scores the same function per item), predictions, the metrics with their
  direction (what --metric-for-best may name), bootstrap intervals, and how predict prints a result.

Adding a task is one entry of TASKS plus its tests; the pipeline never tests the task's name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from scipy.stats import bootstrap, pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error

from .cache import IGNORE  # target of a token that is not scored (padding, special tokens, later sub-tokens)
from .errors import PipelineError


@dataclass
class Outputs:
    """What an evaluation produces, one entry per scored item (an example, or a scored token)."""
    preds: np.ndarray
    labels: np.ndarray
    losses: np.ndarray
    groups: np.ndarray | None = None  # per-token tasks: the example (sentence) of each item, 0..n-1
    scores: np.ndarray | None = None  # multi-label: the probabilities that preds thresholded

    @property
    def examples(self) -> int:
        return int(self.groups.max()) + 1 if self.groups is not None and len(self.groups) else len(self.labels)


@dataclass
class Labels:
    """read_labels' result: per-example targets (None for per-token tasks) and the class names (None: regression)."""
    values: np.ndarray | None
    names: list | None
    stratify: bool = False


class Task:
    name = ""
    per_token = False  # targets per token (cache: token_labels + word_ids) instead of per example (labels)
    filters_by_label = False  # --exclude-labels applies (one label value per row)
    numeric = False  # the target is one number (num_labels = 1)
    head = "AutoModelForSequenceClassification"
    problem_type = "single_label_classification"
    higher_is_better: dict = {}  # metric -> True if higher is better (loss is always there, lower is better)

    # --- labels and tokens ---
    def read_labels(self, ds: datasets.Dataset, cfg) -> Labels:
        raise NotImplementedError

    def eval_labels(self, ds: datasets.Dataset, cfg, run_names: list | None):
        """The targets of an external labeled file, on the run's label ids (unknown labels refused)."""
        from .data import known_labels, read_example_labels

        values, names = read_example_labels(ds, cfg, numeric=run_names is None)
        if run_names is None:
            return values
        known_labels([names[i] for i in np.unique(values)], run_names, cfg)
        index = {n: i for i, n in enumerate(run_names)}
        return np.asarray([index.get(n, -1) for n in names], dtype=np.int64)[values]

    def encode(self, batch: dict, tokenizer, cfg, label_index: dict | None = None) -> dict:
        """datasets.map function (batched): token ids, their count, whether truncation cut the example, token types
        for pairs; per-token tasks add their targets."""
        enc = tokenizer(batch[cfg.text_column], batch[cfg.text_pair_column] if cfg.text_pair_column else None,
                        truncation=True, max_length=cfg.max_length)
        return _encoded(enc, cfg)

    def head_config(self, names: list | None) -> dict:
        """Config overrides of the head: num_labels, problem_type, id2label/label2id."""
        out = {"num_labels": len(names) if names else 1, "problem_type": self.problem_type}
        if names:
            out["id2label"] = dict(enumerate(names))
            out["label2id"] = {n: i for i, n in enumerate(names)}
        return out

    def head_class(self):
        return getattr(transformers, self.head)

    # --- loss and predictions ---
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of a batch (the Hugging Face head's own formula). Per-token tasks: with `items` (the
        scored tokens of the whole global batch / the number of processes) the sum over this process's tokens
        divided by it, so that the processes' averaged gradients are the one-process gradient of the token mean."""
        raise NotImplementedError

    def scored_items(self, labels: torch.Tensor) -> torch.Tensor:
        """How many items of a batch the loss averages over (per-token tasks: the scored tokens)."""
        return torch.tensor(labels.shape[0], device=labels.device)

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, loss of each item), shaped like labels."""
        raise NotImplementedError

    def label_columns(self, cfg) -> list:
        """The columns the labels are read from."""
        return [cfg.label_column]

    def decide(self, out: Outputs, tuning: str = "false", thresholds=None) -> tuple[Outputs, list | None]:
        """Scores -> predictions where a task needs a decision rule (multi-label thresholds); (out, None) here."""
        return out, None

    def collect(self, preds: list, labels: list, losses: list) -> Outputs:
        """The batches' score() results (on the host) as one Outputs."""
        return Outputs(*(torch.cat(t).cpu().numpy() for t in (preds, labels, losses)))

    # --- metrics ---
    def metric_names(self, names: list | None) -> dict:
        """{metric: higher is better} of a run with these label names; loss is always there."""
        return {**self.higher_is_better, "loss": False}

    def default_metric(self, names: list | None) -> str:
        raise NotImplementedError

    def metrics(self, out: Outputs, names: list | None) -> dict:
        values = self._metrics(out.preds, out.labels, names, out.groups)
        return {**values, "loss": float(np.mean(out.losses)) if len(out.losses) else float("nan")}

    def _metrics(self, preds, labels, names, groups=None) -> dict:
        raise NotImplementedError

    def intervals(self, out: Outputs, names: list | None, resamples: int = 1000, level: float = 0.95,
                  seed: int = 0) -> dict:
        """{metric: [low, high]}: percentile bootstrap (scipy.stats.bootstrap) over examples; per-token tasks
        resample whole sentences. Every metric sees the same resamples (one seed), each computed once."""
        values = self._metrics(out.preds, out.labels, names, out.groups)
        if out.examples < 2:
            return {m: [float("nan")] * 2 for m in values}
        if out.groups is None:
            def rows(idx):
                return idx
        else:
            starts = np.searchsorted(out.groups, np.arange(out.examples + 1))

            def rows(idx):
                return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
        memo = {}

        def stat(idx, metric):
            key = idx.tobytes()
            if key not in memo:
                r = rows(idx.astype(int))
                memo[key] = self._metrics(out.preds[r], out.labels[r], names,
                                          None if out.groups is None else out.groups[r])
            return memo[key][metric]
        cis = {}
        for metric in values:
            res = bootstrap((np.arange(out.examples),), lambda idx: stat(idx, metric), vectorized=False,
                            n_resamples=resamples, confidence_level=level, method="percentile",
                            rng=np.random.default_rng(seed))
            cis[metric] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
        return cis

    # --- printing ---
    def headline(self, metrics: dict) -> dict:
        """The metrics of the last line of train and evaluate, in order (the classification line's form)."""
        return metrics

    def show(self, logits: torch.Tensor, id2label: dict, trained: dict | None = None) -> list:
        """predict's result per text from the model's logits (`trained`: the exported config's frozen_top)."""
        raise NotImplementedError

    def format(self, result, text: str, entities: bool = False) -> str:
        """How predict prints one text's result: the label and its probability (or the value), then the text."""
        return "\t".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in result) + f"\t{text}"


def _encoded(enc, cfg) -> dict:
    ids = enc["input_ids"]
    out = {"input_ids": ids, "length": [len(x) for x in ids]}
    if enc.encodings is not None:  # fast tokenizers say what truncation cut
        out["truncated"] = [bool(e.overflowing) for e in enc.encodings]
    else:
        out["truncated"] = [len(x) >= cfg.max_length for x in ids]
    if cfg.text_pair_column and "token_type_ids" in enc:  # token types only where a text pair makes them
        out["token_type_ids"] = enc["token_type_ids"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# one label per text (or pair)


class Classification(Task):
    name = "classification"
    filters_by_label = True
    higher_is_better = {"accuracy": True, "f1": True}

    def read_labels(self, ds, cfg) -> Labels:
        from .data import read_example_labels

        ids, names = read_example_labels(ds, cfg, numeric=False)
        names = _check_label_range(ids, names, cfg)
        if len(names) < 2:
            raise PipelineError(f"label column {cfg.label_column!r} has only one class {names}; need at least 2.")
        return Labels(ids, names, stratify=True)

    def loss(self, logits, labels, items=None):
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))

    def score(self, logits, labels):
        logits = logits.float()
        return logits.argmax(-1), F.cross_entropy(logits, labels, reduction="none")

    def default_metric(self, names):
        return "accuracy"

    def _metrics(self, preds, labels, names, groups=None):
        return {"accuracy": float(accuracy_score(labels, preds)), "f1": float(f1_score(labels, preds, average="macro"))}

    def show(self, logits, id2label, trained=None):
        probs = logits.float().softmax(-1)
        score, idx = probs.max(-1)
        return [(id2label[int(j)], float(p)) for j, p in zip(idx, score)]


class Regression(Task):
    name = "regression"
    filters_by_label = True
    numeric = True
    problem_type = "regression"
    higher_is_better = {"mse": False, "pearson": True, "spearman": True}

    def read_labels(self, ds, cfg) -> Labels:
        from .data import read_example_labels

        return Labels(read_example_labels(ds, cfg, numeric=True)[0], None)

    def loss(self, logits, labels, items=None):
        return F.mse_loss(logits.squeeze(), labels.squeeze())

    def score(self, logits, labels):
        p = logits.float().squeeze(-1)
        return p, (p - labels.float()) ** 2

    def default_metric(self, names):
        return "mse"

    def _metrics(self, preds, labels, names, groups=None):
        def corr(fn):
            return float(fn(preds, labels)[0]) if len(preds) > 1 and np.std(preds) > 0 else float("nan")
        return {"mse": float(mean_squared_error(labels, preds)), "pearson": corr(pearsonr),
                "spearman": corr(spearmanr)}

    def show(self, logits, id2label, trained=None):
        return [(float(v),) for v in logits.float().squeeze(-1)]


def _check_label_range(ids: np.ndarray, names: list, cfg) -> list:
    n = cfg.num_labels
    if n:
        if len(ids) and ids.max() >= n:
            rows = np.flatnonzero(ids >= n)
            numbered = all(name == str(i) for i, name in enumerate(names))
            what = f"class ids up to {int(ids.max())}" if numbered else f"{len(names)} classes {names[:10]}"
            raise PipelineError(
                f"label column {cfg.label_column!r} has {what} but num_labels={n}: {len(rows)} rows are out of range "
                f"0..{n - 1} (first rows: {rows[:5].tolist()}). Raise --num-labels or fix those labels."
            )
        names = names[:n] + [f"LABEL_{i}" for i in range(len(names), n)]  # classes absent from this data
    return names


# ----------------------------------------------------------------------------------------------------------------
# one tag per word: named entities, part of speech, chunks

_ENTITY_TAG = re.compile(r"^(?:[BIESLU])-(.+)$")


def entity_scheme(names: list | None) -> str | None:
    """IOB2 or BIOES when every tag is O or <prefix>-<type> and some tag begins an entity; None for plain tag sets
    (part of speech), which get token accuracy only."""
    if not names or not all(n == "O" or _ENTITY_TAG.match(n) for n in names):
        return None
    prefixes = {n[0] for n in names if n != "O"}
    if "B" not in prefixes and "S" not in prefixes and "U" not in prefixes:
        return None
    return "BIOES" if prefixes & {"E", "S", "L", "U"} else "IOB2"


def iob2_breaks(tags: list) -> int:
    """How many I-X tags follow neither B-X nor I-X (seqeval's default mode reads each as the start of an entity)."""
    count, prev = 0, "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:
            count += 1
        prev = t
    return count


class TokenClassification(Task):
    name = "token-classification"
    per_token = True
    head = "AutoModelForTokenClassification"
    problem_type = None
    higher_is_better = {"accuracy": True, "precision": True, "recall": True, "f1": True}

    def read_labels(self, ds, cfg) -> Labels:
        from .data import read_tag_names

        return Labels(None, read_tag_names(ds, cfg))

    def eval_labels(self, ds, cfg, run_names):
        """None: the tags become per-token targets when the rows are encoded; here they are checked."""
        from .data import known_labels, read_tag_names

        known_labels(read_tag_names(ds, cfg, quiet=True), run_names, cfg, "tags")
        return None

    def encode(self, batch, tokenizer, cfg, label_index=None):
        """Words -> sub-tokens (is_split_into_words); each word's tag on its first sub-token, the others IGNORE
        (or the word's tag with --label-all-tokens true); special tokens IGNORE. Also the word of each token (-1:
        special) and the words truncation cut off."""
        words = batch[cfg.text_column]
        enc = tokenizer(words, truncation=True, max_length=cfg.max_length, is_split_into_words=True)
        out = _encoded(enc, cfg)
        tags = batch.get(cfg.label_column)
        targets, word_ids, cut = [], [], []
        for i in range(len(words)):
            wid = enc.word_ids(i)
            word_ids.append([-1 if w is None else w for w in wid])
            kept = max((w for w in wid if w is not None), default=-1) + 1
            cut.append(len(words[i]) - kept)
            if tags is None:
                continue
            ids = [label_index[t] for t in tags[i]] if label_index is not None else list(tags[i])
            row, prev = [], None
            for w in wid:
                row.append(IGNORE if w is None or (w == prev and not cfg.label_all_tokens) else ids[w])
                prev = w
            targets.append(row)
        out["word_ids"], out["words_cut"] = word_ids, cut
        out["truncated"] = [c > 0 for c in cut]
        if tags is not None:
            out["token_labels"] = targets
        return out

    def head_config(self, names):
        out = super().head_config(names)
        out.pop("problem_type")
        return out

    def loss(self, logits, labels, items=None):
        flat, targets = logits.float().view(-1, logits.shape[-1]), labels.view(-1)
        if items is None:
            return F.cross_entropy(flat, targets, ignore_index=IGNORE)
        return F.cross_entropy(flat, targets, ignore_index=IGNORE, reduction="sum") / items

    def scored_items(self, labels):
        return (labels != IGNORE).sum()

    def score(self, logits, labels):
        logits = logits.float()
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        return logits.argmax(-1), loss

    def collect(self, preds, labels, losses):
        """Padded [B, W] batches -> the scored tokens, with the sentence each belongs to."""
        out, groups, seen = [[], [], []], [], 0
        for p, y, loss in zip(preds, labels, losses):
            y = y.cpu().numpy()
            keep = y != IGNORE
            for store, t in zip(out, (p.cpu().numpy(), y, loss.cpu().numpy())):
                store.append(t[keep])
            groups.append(np.nonzero(keep)[0] + seen)
            seen += len(y)
        empty = np.zeros(0)
        return Outputs(*(np.concatenate(t) if t else empty for t in out),
                       groups=np.concatenate(groups) if groups else empty.astype(int))

    def metric_names(self, names):
        out = {"accuracy": True, "loss": False}
        if names is None or entity_scheme(names):  # unknown tags: any of them may be asked for
            out.update({"precision": True, "recall": True, "f1": True})
        return out

    def default_metric(self, names):
        return "f1" if entity_scheme(names) else "accuracy"

    def _metrics(self, preds, labels, names, groups=None):
        out = {"accuracy": float(np.mean(preds == labels)) if len(labels) else float("nan")}
        scheme = entity_scheme(names)
        if scheme and groups is not None:
            from seqeval.metrics import f1_score as ent_f1, precision_score, recall_score

            true, pred = self._sentences(preds, labels, names, groups)
            out.update({"precision": float(precision_score(true, pred, zero_division=0)),
                        "recall": float(recall_score(true, pred, zero_division=0)),
                        "f1": float(ent_f1(true, pred, zero_division=0))})
        return out

    @staticmethod
    def _sentences(preds, labels, names, groups):
        cuts = np.flatnonzero(np.diff(groups)) + 1
        tag = np.asarray(names, dtype=object)
        return ([list(tag[s]) for s in np.split(labels, cuts)], [list(tag[s]) for s in np.split(preds, cuts)])

    def headline(self, metrics):
        """accuracy=<token accuracy> f1=<entity micro F1> loss=... (f1 only with an entity scheme); precision and
        recall stay in the records and results."""
        return {k: metrics[k] for k in ("accuracy", "f1", "loss") if k in metrics}

    def entity_report(self, out: Outputs, names: list) -> dict | None:
        """Per entity type: precision, recall, F1 and support (seqeval's classification_report)."""
        if not entity_scheme(names) or not len(out.labels):
            return None
        from seqeval.metrics import classification_report

        true, pred = self._sentences(out.preds, out.labels, names, out.groups)
        report = classification_report(true, pred, output_dict=True, zero_division=0)
        return {k: {m: float(v) for m, v in r.items()} for k, r in report.items()}

    def show(self, logits, id2label, trained=None):
        """Per text: [(tag, probability)] of every token position."""
        score, idx = logits.float().softmax(-1).max(-1)
        return [[(id2label[int(j)], float(p)) for j, p in zip(row_i, row_p)] for row_i, row_p in zip(idx, score)]

    def format(self, result, text, entities=False):
        """A word and its tag (and probability) per line, or with entities=True each entity span (type, first
        word, last word, its words, their mean probability); a blank line after each text."""
        rows = self.entities(result) if entities else result
        return "".join("\t".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + "\n"
                       for row in rows)

    @staticmethod
    def words(words: list, word_ids: list, tags: list) -> list:
        """[(word, tag, probability)] from each word's first sub-token (word_ids: the word of each token, -1 or None
        for special tokens); words cut off by max_length get no tag."""
        first = {}
        for pos, w in enumerate(word_ids):
            if w is not None and w >= 0 and w not in first:
                first[w] = tags[pos]
        return [(word, *first.get(j, (None, float("nan")))) for j, word in enumerate(words)]

    @staticmethod
    def entities(tagged: list) -> list:
        """Entity spans of one tagged text (seqeval's reading of the tags): [(type, first word, last word, text,
        mean probability of its words)]."""
        from seqeval.metrics.sequence_labeling import get_entities

        spans = get_entities([tag or "O" for _, tag, _ in tagged])
        return [(kind, s, e, " ".join(w for w, _, _ in tagged[s:e + 1]),
                 float(np.mean([p for _, _, p in tagged[s:e + 1]]))) for kind, s, e in spans]


# ----------------------------------------------------------------------------------------------------------------
# several labels per text: topics, emotions, tags


class MultiLabel(Task):
    name = "multi-label"
    problem_type = "multi_label_classification"
    higher_is_better = {"f1": True, "macro_f1": True, "subset_accuracy": True}

    def label_columns(self, cfg) -> list:
        return [c.strip() for c in cfg.label_columns.split(",")] if cfg.label_columns else [cfg.label_column]

    def read_labels(self, ds, cfg) -> Labels:
        from .data import read_label_sets

        values, names = read_label_sets(ds, cfg)
        empty = int((values.sum(1) == 0).sum())
        if empty:
            print(f"data: {empty} of {len(values)} rows carry no label; kept (a valid \"none of these\")")
        print("data: multi-label rows are split at random (seeded by --split-seed), not stratified")
        return Labels(values, names)

    def eval_labels(self, ds, cfg, run_names):
        from .data import known_labels, read_label_sets

        values, names = read_label_sets(ds, cfg)
        known_labels([n for j, n in enumerate(names) if values[:, j].any()], run_names, cfg)
        out = np.zeros((len(values), len(run_names)), dtype=np.float32)
        for j, n in enumerate(names):
            if n in run_names:
                out[:, run_names.index(n)] = values[:, j]
        return out

    def loss(self, logits, labels, items=None):
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def score(self, logits, labels):
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
        return logits.sigmoid(), loss

    def decide(self, out: Outputs, tuning: str = "false", thresholds=None) -> tuple[Outputs, list]:
        """Probabilities -> 0/1 predictions at the thresholds: the given ones (a run's), or 0.5, or tuned on `out`
        (--threshold-tuning true: the one threshold that maximises micro F1; per-label: each label's own, by that
        label's F1). Returns (decided outputs, the thresholds used, one per label)."""
        probs, labels = out.scores if out.scores is not None else out.preds, out.labels
        c = labels.shape[1]
        if thresholds is None:
            grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
            if tuning == "true":
                best = max(grid, key=lambda t: (f1_score(labels, probs >= t, average="micro", zero_division=0),
                                                -abs(t - 0.5)))
                thresholds = [float(best)] * c
            elif tuning == "per-label":
                thresholds = [float(max(grid, key=lambda t: (f1_score(labels[:, j], probs[:, j] >= t, zero_division=0),
                                                             -abs(t - 0.5)))) for j in range(c)]
            else:
                thresholds = [0.5] * c
        preds = (probs >= np.asarray(thresholds)[None, :]).astype(np.int64)
        return Outputs(preds, labels, out.losses, out.groups, scores=probs), list(thresholds)

    def default_metric(self, names):
        return "f1"

    def _metrics(self, preds, labels, names, groups=None):
        labels = labels.astype(np.int64)
        return {"f1": float(f1_score(labels, preds, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
                "subset_accuracy": float(accuracy_score(labels, preds))}

    def format(self, result, text, entities=False):
        """Every label at or over its threshold with its probability (comma-separated; '-' for none), then the
        text."""
        return (", ".join(f"{name} {p:.4f}" for name, p in result) or "-") + f"\t{text}"

    def show(self, logits, id2label, trained=None):
        """Per text: [(label, probability)] of every label at or over its threshold (the run's; 0.5 without one),
        most probable first."""
        probs = logits.float().sigmoid().numpy()
        thr = np.asarray((trained or {}).get("thresholds") or [0.5] * probs.shape[1])
        return [sorted(((id2label[j], float(p[j])) for j in np.flatnonzero(p >= thr)), key=lambda x: -x[1])
                for p in probs]


TASKS = {t.name: t for t in (Classification(), Regression(), TokenClassification(), MultiLabel())}


def task_for(name: str) -> Task:
    return TASKS[name]


def resolve_metric(task: str, metric: str, names: list | None) -> tuple[str, bool]:
    """(validation metric that picks the best evaluation, True if higher is better); auto = the task's default."""
    t = TASKS[task]
    name = t.default_metric(names) if metric == "auto" else metric
    known = t.metric_names(names)
    if name not in known:
        raise PipelineError(f"--metric-for-best {name} is not a metric of task {task} with these labels; choose one "
                            f"of: {', '.join(known)}.")
    return name, known[name]
