"""Bad input: a clear message naming the problem and the fix, exit status 2, no traceback, no half-written cache."""
import csv

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config

from pipeline.cli import main

from conftest import cli_args, corpus_rows


def _fail(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def _opts(tmp_path, model, dataset, **kw):
    return cli_args(dict(model=model, dataset=dataset, cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs",
                         k=1, max_length=32, **kw))


def _no_cache_written(tmp_path):
    d = tmp_path / "cache"
    return not d.exists() or not any(p.suffix in (".h5", ".tmp") for p in d.iterdir())


def test_missing_column_lists_existing_columns(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), small_csv, text_column="review"))
    assert "no column(s) ['review']" in err and "['text', 'category']" in err and "--text-column" in err
    assert _no_cache_written(tmp_path)


def test_unknown_model_path(tmp_path, small_csv, capsys):
    err = _fail(capsys, "precompute", *_opts(tmp_path, tmp_path / "no-such-model", small_csv))
    assert "cannot load model" in err and "local folder" in err
    assert _no_cache_written(tmp_path)


def test_model_folder_without_config(tmp_path, small_csv, capsys):
    (tmp_path / "empty-model").mkdir()
    err = _fail(capsys, "precompute", *_opts(tmp_path, tmp_path / "empty-model", small_csv))
    assert "has no loadable Hugging Face config" in err


def test_missing_dataset_file(tmp_path, tiny_model, capsys):
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), tmp_path / "nope.csv"))
    assert "does not exist" in err


def test_empty_split(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), small_csv), "--split", "train[:0]")
    assert "empty" in err or "cannot take split" in err
    assert _no_cache_written(tmp_path)


def test_unknown_split(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), small_csv), "--split", "dev")
    assert "cannot take split 'dev'" in err


def test_missing_labels(tmp_path, tiny_model, capsys):
    path = tmp_path / "holes.csv"
    rows = corpus_rows(40)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category"])
        for i, r in enumerate(rows):
            w.writerow([r["text"], "" if i in (3, 17) else r["category"]])
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), path))
    assert "2 missing (None/NaN) labels" in err and "[3, 17]" in err
    assert _no_cache_written(tmp_path)


def test_k_out_of_range(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), small_csv), "--k", 3)
    assert "k=3 is out of range" in err and "0 <= k <= 2" in err
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), small_csv), "--k", -1)
    assert "k=-1 must be >= 0" in err


def test_invalid_numbers(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv), "--lr", 0, "--batch-size", 0)
    assert "lr=0.0 must be > 0" in err and "batch_size=0 must be >= 1" in err


def test_unsupported_architecture(tmp_path, small_csv, capsys):
    path = tmp_path / "tiny-gpt2"
    AutoModelForSequenceClassification.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2)).save_pretrained(path)
    err = _fail(capsys, "precompute", *_opts(tmp_path, path, small_csv))
    assert "'gpt2' model" in err and "bert, camembert, distilbert, electra, roberta, xlm-roberta" in err


def test_train_without_cache(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv))
    assert "no cache at" in err and "make precompute" in err


def test_cache_for_another_k_or_model_is_refused(tmp_path, tiny_model, small_csv, capsys):
    main(["precompute", *_opts(tmp_path, tiny_model(), small_csv)])
    capsys.readouterr()
    (cache,) = (tmp_path / "cache").glob("*.h5")
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv), "--k", 2, "--cache", cache)
    assert "k: cache has 1, config wants 2" in err and "make precompute" in err
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model("roberta"), small_csv), "--cache", cache)
    assert "model: cache has" in err
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv), "--max-length", 16, "--cache", cache)
    assert "max_length: cache has 32, config wants 16" in err


def test_changed_model_weights_are_detected(tmp_path, tiny_model, small_csv, capsys):
    src = tiny_model()
    model = tmp_path / "model"
    m = AutoModelForSequenceClassification.from_pretrained(src)
    m.save_pretrained(model)

    AutoTokenizer.from_pretrained(src).save_pretrained(model)
    main(["precompute", *_opts(tmp_path, model, small_csv)])
    capsys.readouterr()
    with torch.no_grad():
        m.base_model.embeddings.word_embeddings.weight[5] += 1.0  # fine-tuned elsewhere: the bottom changed
    m.save_pretrained(model)
    err = _fail(capsys, "train", *_opts(tmp_path, model, small_csv))
    assert "differ from those that built" in err and "--force" in err


def test_truncated_cache_file(tmp_path, tiny_model, small_csv, capsys):
    main(["precompute", *_opts(tmp_path, tiny_model(), small_csv)])
    capsys.readouterr()
    (cache,) = (tmp_path / "cache").glob("*.h5")
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 3])
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv))
    assert str(cache) in err and "not a readable cache" in err
