"""Bad input: a clear message naming the problem and the fix, exit status 2, no traceback, no half-written cache."""
import csv
import json
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config

from pipeline.cli import main

from conftest import cli_args, corpus_rows, options, run_cli, write_csv


def _fail(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def _opts(tmp_path, model, dataset, **kw):
    return cli_args(options(tmp_path, model, dataset, **{"max_length": 32, **kw}))


def _no_cache_written(tmp_path):
    d = tmp_path / "cache"
    return not d.exists() or not any(p.suffix in (".h5", ".tmp") for p in d.iterdir())


def test_missing_column_lists_existing_columns(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), small_csv, text_column="review"))
    assert "no column(s) ['review']" in err and "['text', 'label']" in err and "--text-column" in err
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
    path = write_csv(tmp_path / "holes.csv", ["text", "label"],
                     ([r["text"], "" if i in (3, 17) else r["category"]] for i, r in enumerate(corpus_rows(40))))
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), path))
    assert "2 missing (None/NaN/empty) labels" in err and "[3, 17]" in err
    assert _no_cache_written(tmp_path)


def test_k_out_of_range(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), small_csv), "--k", 4)
    assert "depth 4 is out of range" in err and "0 <= k <= 3" in err and "k=3 trains the head only" in err
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), small_csv), "--k", -1)
    assert "k=-1 must be >= 0" in err


def test_invalid_numbers(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv), "--lr", 0, "--batch-size", 0)
    assert "lr=0.0 must be > 0" in err and "batch_size=0 must be >= 1" in err


def test_unsupported_architecture(tmp_path, small_csv, capsys):
    path = tmp_path / "tiny-gpt2"
    AutoModelForSequenceClassification.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2)).save_pretrained(path)
    err = _fail(capsys, "precompute", *_opts(tmp_path, path, small_csv))
    assert "'gpt2' model" in err and ("bert, camembert, deberta-v2, distilbert, electra, llama, mistral, modernbert, "
                                      "qwen2, qwen3, roberta, xlm-roberta") in err


def test_train_without_cache(tmp_path, tiny_model, small_csv, capsys):
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv))
    assert "no cache at" in err and "make precompute" in err


def test_cache_for_another_k_or_model_is_refused(tmp_path, tiny_model, small_csv, capsys):
    main(["precompute", *_opts(tmp_path, tiny_model(), small_csv)])
    capsys.readouterr()
    (cache,) = (tmp_path / "cache").glob("*.h5")
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv), "--k", 2, "--cache", cache)
    assert "holds the hidden states at depths [1]; this run trains from depth(s) [2]" in err and "--depths 1,2" in err
    err = _fail(capsys, "train", *_opts(tmp_path, tiny_model(), small_csv), "--k", 2)
    assert "no cache at" in err
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


def _jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def _texts(n):
    return [r["text"] for r in corpus_rows(n)]


def test_empty_dataset_file(tmp_path, tiny_model, capsys):
    path = tmp_path / "header-only.csv"
    path.write_text("text,label\n")
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), path))
    assert "is empty" in err and _no_cache_written(tmp_path)


def test_null_nan_and_empty_labels(tmp_path, tiny_model, capsys):
    rows = [{"text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(_texts(40))]
    rows[2]["label"], rows[5]["label"], rows[7]["label"], rows[11]["label"] = None, float("nan"), "", "  "
    path = _jsonl(tmp_path / "holes.jsonl", rows)
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), path, label_column="label",
                                                exclude_labels="none"))
    assert "4 missing (None/NaN/empty) labels" in err and "[2, 5, 7, 11]" in err


def test_labels_out_of_range_for_num_labels(tmp_path, tiny_model, capsys):
    path = _jsonl(tmp_path / "five.jsonl", [{"text": t, "label": i % 5} for i, t in enumerate(_texts(50))])
    opts = _opts(tmp_path, tiny_model(), path, label_column="label", exclude_labels="none")
    err = _fail(capsys, "precompute", *opts, "--num-labels", 3)
    assert "class ids up to 4 but num_labels=3" in err and "20 rows are out of range 0..2" in err
    assert "[3, 4, 8, 9, 13]" in err and "--num-labels" in err
    path = _jsonl(tmp_path / "words.jsonl", [{"text": t, "label": "abc"[i % 3]} for i, t in enumerate(_texts(30))])
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), path, label_column="label",
                                                exclude_labels="none"), "--num-labels", 2)
    assert "3 classes ['a', 'b', 'c'] but num_labels=2" in err


def test_num_labels_larger_than_the_data_is_kept(tmp_path, tiny_model):
    from pipeline import make_config
    from pipeline.cache import open_cache
    from pipeline.precompute import precompute

    path = _jsonl(tmp_path / "two.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(_texts(40))])
    cfg = make_config(model=tiny_model(), dataset=str(path), label_column="label", exclude_labels=None, k=1,
                      num_labels=4, cache_dir=str(tmp_path / "cache"), max_length=32)
    info = open_cache(precompute(cfg), cfg)
    assert info.num_labels == 4 and info.label_names == ["0", "1", "LABEL_2", "LABEL_3"]


def test_mixed_label_types(tmp_path, tiny_model, capsys):
    path = _jsonl(tmp_path / "mixed.jsonl", [{"text": t, "label": "pos" if i % 2 else 0}
                                             for i, t in enumerate(_texts(20))])
    err = _fail(capsys, "precompute", *_opts(tmp_path, tiny_model(), path, label_column="label",
                                                exclude_labels="none"))
    assert "mixes label types ['int', 'str']" in err and "use all strings or all integers" in err


def test_empty_texts_dropped_with_a_count_or_refused(tmp_path, tiny_model, capsys):
    rows = [{"text": t, "label": "fresh" if i % 2 else "rotten"} for i, t in enumerate(_texts(60))]
    rows[4]["text"], rows[9]["text"], rows[30]["text"] = "", "   ", "\n\t"
    path = tmp_path / "blank.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    opts = _opts(tmp_path, tiny_model(), path)
    err = _fail(capsys, "precompute", *opts, "--empty-texts", "error")
    assert "empty or whitespace-only text" in err and "--empty-texts drop" in err
    main(["precompute", *opts])
    out = capsys.readouterr().out
    assert "dropped 3 of 60 rows with an empty or whitespace-only text" in out
    (cache,) = (tmp_path / "cache").glob("*.h5")
    import h5py
    with h5py.File(cache) as f:
        n = sum(f[s]["lengths"].shape[0] for s in ("train", "validation", "test"))
        assert n == 57  # the empty cell (read as None) and the two whitespace-only texts


def test_overlong_texts_are_truncated_and_said_so(tmp_path, tiny_model, small_csv, capsys):
    main(["precompute", *_opts(tmp_path, tiny_model(), small_csv), "--max-length", "16"])
    out = capsys.readouterr().out
    m = re.search(r"data: (\d+) of 160 examples are longer than max_length=16 tokens and are truncated \(right side\)",
                  out)
    assert m and int(m.group(1)) > 50 and "--max-length" in out


@pytest.mark.parametrize("what", ["model", "dataset"])
def test_hub_id_while_offline(tmp_path, tiny_model, small_csv, what):
    model, dataset = (("bert-base-uncased", small_csv) if what == "model" else (tiny_model(), "imdb"))
    proc = run_cli("precompute", *_opts(tmp_path, model, dataset), env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "offline" in proc.stderr and "local" in proc.stderr and f"--{what}" in proc.stderr


def test_output_paths_that_are_not_writable(tmp_path, tiny_model, small_csv, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    opts = cli_args(dict(model=tiny_model(), dataset=small_csv, k=1, max_length=32))
    err = _fail(capsys, "precompute", *opts, "--cache-dir", blocker / "cache")
    assert "cache folder" in err and "is not writable" in err and "--cache-dir" in err
    main(["precompute", *opts, "--cache-dir", str(tmp_path / "cache")])
    capsys.readouterr()
    err = _fail(capsys, "train", *opts, "--cache-dir", tmp_path / "cache", "--runs-dir", blocker / "runs")
    assert "run directory" in err and "is not writable" in err and "--runs-dir" in err
