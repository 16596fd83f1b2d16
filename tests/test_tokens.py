"""Token classification (NER, POS): CoNLL / CoNLL-U / JSON lines / parquet inputs, first-sub-token alignment, the
per-token cache, the *ForTokenClassification top exact against the full model at every depth for every family,
entity metrics (seqeval) with sentence bootstrap, evaluate on the cache and on a file, predict, and bad input.
Real tiny models, real WNUT-2016 tweets (the `ner` preset's file), real files."""
import copy
import json
import os
from dataclasses import replace

import datasets
import h5py
import numpy as np
import pytest
import torch

from pipeline import make_config
from pipeline.cache import CachedSplit, check_cache, open_cache, pad_ragged
from pipeline.config import NER_DATA
from pipeline.data import file_format, load_labeled, load_source
from pipeline.errors import PipelineError
from pipeline.export import predict
from pipeline.model import carry_over, load_full_model, load_tokenizer, load_top
from pipeline.precompute import precompute
from pipeline.tasks import IGNORE, TASKS, Outputs, entity_scheme, iob2_breaks
from pipeline.verify import verify

from conftest import ROOT, cli_args, options

from test_families import FAMILIES, L, _arch, _to_full_name

WNUT = os.path.join(ROOT, NER_DATA)
TOKENS = "token-classification"


def wnut_sentences(n, start=0):
    """n tweets of the real WNUT-2016 file: [[(word, tag), ...], ...]."""
    out, cur = [], []
    with open(WNUT, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                if cur:
                    out.append(cur)
                    cur = []
                continue
            word, tag = line.rstrip("\n").split("\t")
            cur.append((word, tag))
    return out[start:start + n]


def write_conll(path, sentences, sep="\t", docstart=False, blank=""):
    with open(path, "w", encoding="utf-8") as fh:
        if docstart:
            fh.write("-DOCSTART- -X- O O\n\n")
        for s in sentences:
            fh.writelines(f"{w}{sep}{t}\n" for w, t in s)
            fh.write(blank + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ner_file(tmp_path_factory):
    """120 real tweets as a CoNLL file (word<TAB>tag, a blank line between tweets)."""
    return write_conll(tmp_path_factory.mktemp("ner") / "tweets.conll", wnut_sentences(120))


def tok_opts(tmp_path, model, dataset, **kw):
    return options(tmp_path, model, dataset, task=TOKENS, exclude_labels=None, **kw)


def tok_cfg(tmp_path, model, dataset, **kw):
    return make_config("default", **tok_opts(tmp_path, model, dataset, **kw))


# --- inputs -------------------------------------------------------------------------------------------------


@pytest.mark.fast
def test_conll_columns_docstart_whitespace_separators_and_label_column(tmp_path):
    sents = wnut_sentences(3)
    p = write_conll(tmp_path / "a.conll", sents, docstart=True, blank="  \t")  # whitespace-only separator lines
    ds = load_source(make_config(dataset=p, task=TOKENS))
    assert ds["text"] == [[w for w, _ in s] for s in sents] and ds["label"] == [[t for _, t in s] for s in sents]
    # four space-separated columns (CoNLL-2003 style), sniffed from a .txt; tags in the last unless --label-column
    rows = "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n"
    (tmp_path / "c.txt").write_text(rows)
    cfg = make_config(dataset=str(tmp_path / "c.txt"), task=TOKENS)
    assert file_format(cfg) == "conll"
    assert load_source(cfg)["label"] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert load_source(replace(cfg, label_column="1"))["1"] == [["NNP", "VBZ"], ["NNP", "NNP"]]
    with pytest.raises(PipelineError, match=r"--label-column 7: .* has 4 columns \(0..3\)"):
        load_source(replace(cfg, label_column="7"))
    # the same as a .tsv without a header: CoNLL too; a pandas-style TSV with a header is not CoNLL
    (tmp_path / "c.tsv").write_text(rows.replace(" ", "\t"))
    assert file_format(make_config(dataset=str(tmp_path / "c.tsv"), task=TOKENS)) == "conll"
    (tmp_path / "d.txt").write_text("text\tlabel\nan ok film\tfresh\n\nflat and dull\trotten\n")
    assert file_format(make_config(dataset=str(tmp_path / "d.txt"))) == "tsv"
    (tmp_path / "d.tsv").write_text("text\tlabel\nan ok film\tfresh\nflat and dull\trotten\n")
    assert file_format(make_config(dataset=str(tmp_path / "d.tsv"))) == "tsv"


@pytest.mark.fast
def test_conllu_form_and_field_skips_multiword_ranges_and_empty_nodes(tmp_path):
    text = ("# sent_id = 1\n# text = Vámonos al mar.\n"
            "1-2\tVámonos\t_\t_\t_\t_\t_\t_\t_\t_\n"
            "1\tVamos\tir\tVERB\tV\t_\t0\troot\t_\t_\n"
            "2\tnos\tnosotros\tPRON\tP\t_\t1\tobj\t_\t_\n"
            "2.1\tgo\tgo\tVERB\tV\t_\t_\t_\t0:root\t_\n"
            "3\tal\ta\tADP\tS\t_\t4\tcase\t_\t_\n"
            "4\tmar\tmar\tNOUN\tN\t_\t1\tobl\t_\tSpaceAfter=No\n\n"
            "1\tSí\tsí\tINTJ\tI\t_\t0\troot\t_\t_\n\n")
    p = tmp_path / "es.conllu"
    p.write_text(text, encoding="utf-8")
    ds = load_source(make_config(dataset=str(p), task=TOKENS))
    assert ds["text"] == [["Vamos", "nos", "al", "mar"], ["Sí"]]
    assert ds["label"] == [["VERB", "PRON", "ADP", "NOUN"], ["INTJ"]]  # upos by default
    assert load_source(make_config(dataset=str(p), task=TOKENS, label_column="deprel"))["deprel"][0] == [
        "root", "obj", "case", "obl"]
    with pytest.raises(PipelineError, match="not a CoNLL-U field"):
        load_source(make_config(dataset=str(p), task=TOKENS, label_column="tag"))


def test_json_lines_strings_and_parquet_classlabel_ids(tmp_path):
    sents = wnut_sentences(40)
    rows = [{"tokens": [w for w, _ in s], "ner_tags": [t for _, t in s]} for s in sents]
    jl = tmp_path / "ner.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = load_labeled(make_config(dataset=str(jl), task=TOKENS, text_column="tokens", label_column="ner_tags",
                                 exclude_labels=None))
    # the Hub convention: ner_tags as ClassLabel ids, whose names are used (in the feature's order)
    names = sorted({t for r in rows for t in r["ner_tags"]}, reverse=True)
    feats = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                               "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    ds = datasets.Dataset.from_dict({"tokens": [r["tokens"] for r in rows],
                                     "ner_tags": [[names.index(t) for t in r["ner_tags"]] for r in rows]}, feats)
    pq = tmp_path / "ner.parquet"
    ds.to_parquet(pq)
    b = load_labeled(make_config(dataset=str(pq), task=TOKENS, text_column="tokens", label_column="ner_tags",
                                 exclude_labels=None))
    assert a.label_names == sorted(names) and b.label_names == names
    assert a.labels is None and [len(v) for v in a.splits.values()] == [len(v) for v in b.splits.values()]


@pytest.mark.fast
def test_tag_scheme_and_iob2_breaks():
    assert entity_scheme(["B-loc", "I-loc", "O"]) == "IOB2"
    assert entity_scheme(["B-loc", "E-loc", "S-loc", "I-loc", "O"]) == "BIOES"
    assert entity_scheme(["NOUN", "VERB"]) is None and entity_scheme(["I-NP", "O"]) is None
    assert iob2_breaks(["O", "I-loc", "I-loc", "B-per", "I-loc", "B-loc", "I-loc"]) == 2


# --- alignment and the cache --------------------------------------------------------------------------------


def test_first_subtoken_alignment_label_all_tokens_and_words_cut(tmp_path, tiny_model):
    tokenizer = load_tokenizer(make_config(model=tiny_model("bert")))
    cfg = make_config(task=TOKENS, max_length=8)
    batch = {"text": [["Hello", "Schwarzenegger", "!"], ["a", "b", "c", "d", "e", "f", "g", "h"]],
             "category": [["O", "B-person", "O"], ["O"] * 8]}
    index = {"O": 0, "B-person": 1}
    task = TASKS[TOKENS]
    out = task.encode(batch, tokenizer, cfg, index)
    pieces = tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    assert len(pieces) > 5  # Schwarzenegger is several sub-tokens
    want = [IGNORE] + [(1 if w == 1 else 0) if w != prev else IGNORE for w, prev in
                       zip(out["word_ids"][0][1:-1], [None] + out["word_ids"][0][1:-2])] + [IGNORE]
    assert out["token_labels"][0] == want and out["token_labels"][0].count(1) == 1
    assert out["words_cut"] == [0, 2] and out["truncated"] == [False, True]  # 8 tokens: CLS + 6 words + SEP
    every = task.encode(batch, tokenizer, replace(cfg, label_all_tokens=True), index)
    assert every["token_labels"][0].count(1) == out["word_ids"][0].count(1)  # every sub-token of the word


def test_cache_holds_per_token_targets_and_word_ids(tmp_path, tiny_model, ner_file):
    cfg = tok_cfg(tmp_path, tiny_model("bert"), ner_file, max_length=16)
    path = precompute(cfg)
    ok, problems = check_cache(path)
    assert not problems, problems
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 4 and f.attrs["task"] == TOKENS
        g = f["train"]
        assert "labels" not in g and g["token_labels"].shape == g["input_ids"].shape == g["word_ids"].shape
        cut, lengths = g["words_cut"][:], g["lengths"][:]
        assert cut.sum() > 0 and (lengths[cut > 0] == 16).all()  # only truncated tweets lose words
        wid, lab = g["word_ids"][:], g["token_labels"][:]
        assert (lab[wid == -1] == IGNORE).all()  # special tokens are never scored
    info = open_cache(path, cfg)
    assert "B-person" in info.label_names and len(info.label_names) > 5
    batch = CachedSplit(path, "validation", 1).__getitems__([0, 5, 11])
    assert batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    r = verify(cfg, path, samples=16)
    assert r["max_abs_logit_diff"] <= 5e-3, r  # fp16 storage


# --- exactness for every family -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_token_top_equals_the_full_model_at_every_depth(tmp_path, tiny_model, ner_file, model_type, record_property):
    """*ForTokenClassification from one multi-depth cache: at each k the lean top gives the full model's logits on
    every real token, and with the task's one loss the gradient of every trainable parameter of the full model
    with the bottom frozen by requires_grad=False."""
    arch, task = _arch(model_type), TASKS[TOKENS]
    cfg = tok_cfg(tmp_path, tiny_model(model_type), ner_file, depths="0,1,2,3", k=1, cache_dtype="float32",
                  max_length=32, attn_implementation=arch.attention[0])
    path = precompute(cfg)
    info = open_cache(path, cfg)
    full = load_full_model(cfg, info.num_labels, info.label_names).eval()
    assert type(full).__name__.endswith("ForTokenClassification")
    n = 12
    worst = {"logits": 0.0, "grads": 0.0}
    for k in range(L + 1):
        at = replace(cfg, k=k)
        split = CachedSplit(path, "validation", k)
        batch = split.__getitems__(list(range(n)))
        with h5py.File(path) as f:
            ids = f["validation/input_ids"][:].astype(np.int64)
        mask = batch["attention_mask"].bool()
        input_ids = torch.from_numpy(pad_ragged(ids, split.offsets[:n], split.lengths[:n], 0)[0])
        top, digest = load_top(at, info.num_labels, info.label_names)
        assert digest == info.weights_sha256[k]
        top.eval()
        got = top(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
        ref_model = copy.deepcopy(full)
        carry_over(top.state_dict(), ref_model, shift=k)  # the same fresh token head on both sides
        for name, p in ref_model.named_parameters():
            p.requires_grad_(not arch.is_frozen(name, k))
        ref = ref_model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
        worst["logits"] = max(worst["logits"], (got[mask] - ref[mask]).abs().max().item())
        assert worst["logits"] <= 1e-5, k
        task.loss(ref, batch["labels"]).backward()
        task.loss(got, batch["labels"]).backward()
        ref_grads = {n_: p.grad for n_, p in ref_model.named_parameters() if p.requires_grad}
        top_grads = {_to_full_name(n_, k): p.grad for n_, p in top.named_parameters() if p.requires_grad}
        assert set(ref_grads) == set(top_grads), (k, set(ref_grads) ^ set(top_grads))
        for name, g in ref_grads.items():
            worst["grads"] = max(worst["grads"], (g - top_grads[name]).abs().max().item())
            assert worst["grads"] <= 1e-5, (k, name)
    for name, value in worst.items():
        record_property(f"max_abs_{name}_diff", value)


# --- metrics --------------------------------------------------------------------------------------------------


@pytest.mark.fast
def test_entity_metrics_token_accuracy_and_sentence_bootstrap():
    names = ["B-loc", "B-per", "I-loc", "I-per", "O"]
    tid = {n: i for i, n in enumerate(names)}
    true = [["B-per", "I-per", "O", "B-loc"], ["O", "B-loc", "I-loc"], ["B-per", "O"]]
    pred = [["B-per", "I-per", "O", "O"], ["O", "B-loc", "O"], ["B-per", "O"]]
    groups = np.concatenate([[i] * len(s) for i, s in enumerate(true)])
    out = Outputs(np.array([tid[t] for s in pred for t in s]), np.array([tid[t] for s in true for t in s]),
                  np.zeros(len(groups)), groups)
    task = TASKS[TOKENS]
    m = task.metrics(out, names)
    # entities: per(0-1) ok, loc(3) missed, loc(1-2) predicted as loc(1): wrong span, per ok -> 2 of 4 true, 2 of 3
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)) and m["accuracy"] == pytest.approx(7 / 9)
    assert set(task.headline(m)) == {"accuracy", "f1", "loss"}
    assert task.entity_report(out, names)["per"]["f1-score"] == 1.0
    ci = task.intervals(out, names, resamples=200)
    assert ci["f1"][0] <= m["f1"] <= ci["f1"][1] and ci == task.intervals(out, names, resamples=200)
    pos = task.metrics(Outputs(np.array([0, 1]), np.array([0, 0]), np.zeros(2), np.array([0, 0])), ["NOUN", "VERB"])
    assert set(pos) == {"accuracy", "loss"}  # no entity scheme: token accuracy only


# --- the command line: train, evaluate (cache and file), predict, bad input -----------------------------------


def test_cli_train_evaluate_predict_and_unknown_tags(tmp_path, tiny_model, ner_file, cli):
    opts = tok_opts(tmp_path, tiny_model("bert"), ner_file, run_name="ner", epochs=2, lr=1e-3)
    cli("precompute", *cli_args(opts))
    out = cli("train", *cli_args(opts)).stdout.strip().splitlines()
    last = out[-1].split()
    assert [kv.split("=")[0] for kv in last] == ["accuracy", "f1", "loss"], out[-1]
    run = tmp_path / "runs" / "ner"
    res = json.loads((run / "results.json").read_text())
    assert res["best"]["metric"] == "f1" and 0 <= res["metrics"]["precision"] <= 1
    ev = cli("evaluate", "--run", run, "--resamples", "50").stdout
    assert "(95% bootstrap CI)" in ev and "person" in ev and "scored tokens" in ev
    test = json.loads((run / "eval_test.json").read_text())
    # the same tweets as an external CoNLL file: the merged model scores the same tokens the same way
    cfg = tok_cfg(tmp_path, tiny_model("bert"), ner_file)
    data = load_labeled(cfg)
    test_rows = [data.ds[int(i)] for i in data.splits["test"]]
    ext = write_conll(tmp_path / "heldout.conll", [list(zip(r["text"], r["label"])) for r in test_rows])
    cli("evaluate", "--run", run, "--dataset", ext, "--resamples", "50")
    got = json.loads((run / "eval_heldout.json").read_text())
    assert got["scored_tokens"] == test["scored_tokens"]
    assert got["metrics"]["accuracy"] == test["metrics"]["accuracy"] and got["metrics"]["f1"] == test["metrics"]["f1"]
    assert got["metrics"]["loss"] == pytest.approx(test["metrics"]["loss"], abs=1e-3)  # fp16 cache vs exact
    # a tag the run does not know
    bad = write_conll(tmp_path / "bad.conll", [[("Paris", "B-city"), ("rocks", "O")]])
    r = cli("evaluate", "--run", run, "--dataset", bad, check=False)
    assert r.returncode == 2 and "B-city" in r.stderr and "B-person" in r.stderr and "Traceback" not in r.stderr
    # predict: a word and its tag per line; --entities: spans
    p = cli("predict", "--model-dir", run, "Justin Bieber in New York", "hello").stdout
    blocks = p.strip("\n").split("\n\n")
    assert [line.split("\t")[0] for line in blocks[0].splitlines()] == ["Justin", "Bieber", "in", "New", "York"]
    assert blocks[1].split("\t")[0] == "hello" and blocks[1].split("\t")[1] in json.loads(
        (run / "config.json").read_text())["label_names"]
    e = cli("predict", "--model-dir", run, "--entities", "Justin Bieber in New York").stdout
    for line in e.strip().splitlines():
        kind, first, last, text, score = line.split("\t")
        assert int(first) <= int(last) and 0 <= float(score) <= 1 and text
    # the export: transformers' own token-classification pipeline tags as predict does. Words that are one
    # sub-token each, so the pipeline's per-token tags are predict's per-word tags.
    cli("export", "--run", run)
    from transformers import pipeline

    texts = ["john smith went to new york city today", "the new york times said paris and london", "i love music"]
    tagger = pipeline("token-classification", model=str(run / "export"), aggregation_strategy="simple")
    task, tagged = predict(str(run / "export"), texts)  # what `predict --entities` prints, before printing
    spans = 0
    for text, words, got in zip(texts, tagged, tagger(texts)):
        ours = task.entities(words)
        assert [(e["entity_group"], e["word"]) for e in got] == [(k, t) for k, _, _, t, _ in ours], (text, got, ours)
        for e, row in zip(got, ours):
            assert abs(e["score"] - row[4]) < 1e-3
        spans += len(got)
    assert spans > 0, "the comparison saw no entity at all"


@pytest.mark.parametrize("content,message", [
    ("Paris\tB-loc\nis\tO\tX\n", r"line 2: 3 column\(s\), but line 1 has 2"),
    ("Paris\tB-loc\n\tO\n", r"line 2: the word column is empty"),
])
def test_bad_conll_lines_are_refused_with_file_and_line(tmp_path, tiny_model, content, message, cli):
    p = tmp_path / "bad.conll"
    p.write_text(content)
    r = cli("precompute", *cli_args(tok_opts(tmp_path, tiny_model("bert"), str(p))), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "bad.conll" in r.stderr and __import__("re").search(message, r.stderr), r.stderr
    assert not list((tmp_path / "cache").glob("*.h5*"))  # nothing cached


def test_bad_token_rows_and_iob2_breaks(tmp_path, tiny_model, cli):
    jl = tmp_path / "rows.jsonl"
    good = [{"tokens": ["a", "b"], "tags": ["B-x", "O"]}] * 10
    for rows, message in (([{"tokens": [], "tags": []}] + good, "a sentence with no words"),
                          ([{"tokens": ["a", " "], "tags": ["O", "O"]}] + good, "has an empty word"),
                          ([{"tokens": ["a", "b"], "tags": ["O"]}] + good, "2 words but 1 tags")):
        jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = make_config(dataset=str(jl), task=TOKENS, text_column="tokens", label_column="tags",
                          exclude_labels=None)
        with pytest.raises(PipelineError, match=message):
            load_labeled(cfg)
    jl.write_text("".join(json.dumps(r) + "\n" for r in good + [{"tokens": ["a", "b"], "tags": ["O", "I-x"]}]))
    r = cli("precompute", *cli_args(tok_opts(tmp_path, tiny_model("bert"), str(jl), text_column="tokens",
                                                 label_column="tags")))
    assert "1 tags break the IOB2 scheme" in r.stdout and "first rows [10]" in r.stdout


def test_wnut_default_preset_reads_the_packaged_tweets():
    cfg = make_config("ner")
    assert file_format(cfg) == "conll"
    data = load_labeled(cfg)
    words = sum(len(w) for w in data.ds[cfg.text_column])
    types = {n[2:] for n in data.label_names if n != "O"}
    assert (len(data.ds), words, len(types)) == (2394, 46469, 10)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 1916, "validation": 239, "test": 239}
    assert make_config("ner").best_metric(data.label_names) == ("f1", True)


def test_two_processes_train_a_token_task_like_one(tmp_path, tiny_model, ner_file, cli):
    """The batch is global: each of 2 processes takes half of it and holds another number of scored tokens. The
    loss is the token mean of the whole batch either way (each process's sum over the global count), and the
    per-token validation outputs are padded to one width before they are gathered: 2 processes give the
    1-process weights and validation metrics."""
    from test_scale import assert_two_processes_train_like_one

    opts = cli_args(tok_opts(tmp_path, tiny_model("bert", dropout=False), ner_file, epochs=1, lr=1e-3,
                             checkpoint_every=-1, max_length=32))
    assert_two_processes_train_like_one(tmp_path, opts, cli)
