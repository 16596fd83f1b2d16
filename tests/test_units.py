"""Pure unit tests (`make test-fast`): config validation, labels, splits, formats, grid expansion, carry-over,
trainer state, metrics. No model forward, no subprocess; each runs in well under a second."""
import numpy as np
import pytest
import torch

from pipeline import make_config
from pipeline.cli import build_parser, config_from_args
from pipeline.config import literal_choices
from pipeline.data import file_format, load_for_eval, read_example_labels, split_indices
from pipeline.errors import PipelineError
from pipeline.tasks import TASKS, Outputs
from pipeline.model import carry_over
from pipeline.rundir import TrainerState
from pipeline.sweep import grid_points, pick_best, slug

pytestmark = pytest.mark.fast


def test_config_reports_every_problem_at_once():
    with pytest.raises(PipelineError) as e:
        make_config(task="ranking", cache_dtype="int8", lr=0, epochs=0, metric_for_best="pearson",
                    early_stopping_patience=-1)
    msg = str(e.value)
    for part in ("task='ranking' must be one of: classification, regression", "cache_dtype='int8' must be one of",
                 "lr=0 must be > 0", "epochs=0", "early_stopping_patience=-1"):
        assert part in msg, part
    with pytest.raises(PipelineError, match="metric_for_best='pearson' does not apply to task='classification'"):
        make_config(metric_for_best="pearson")
    with pytest.raises(PipelineError, match="metric_for_best='accuracy' does not apply to task='regression'"):
        make_config(task="regression", metric_for_best="accuracy")


def test_literal_fields_give_argparse_choices_and_best_metric_direction():
    choices = literal_choices()
    assert choices["task"] == tuple(TASKS) and "conll" in choices["dataset_format"]  # one entry per task
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--metric-for-best", "auc"])
    args = parser.parse_args(["train", "--metric-for-best", "loss", "--dataset-format", "tsv"])
    cfg = config_from_args(args)
    assert cfg.best_metric() == ("loss", False) and cfg.dataset_format == "tsv"
    assert make_config().best_metric() == ("accuracy", True)
    assert make_config(task="regression").best_metric() == ("mse", False)
    assert make_config(task="regression", metric_for_best="pearson").best_metric() == ("pearson", True)
    tokens = make_config(task="token-classification")
    assert tokens.best_metric(["B-loc", "I-loc", "O"]) == ("f1", True)  # an entity scheme: seqeval's F1
    assert tokens.best_metric(["ADJ", "NOUN", "VERB"]) == ("accuracy", True)  # POS tags: token accuracy
    with pytest.raises(PipelineError, match="not a metric of task token-classification"):
        make_config(task="token-classification", metric_for_best="f1").best_metric(["ADJ", "NOUN"])


def test_cache_names_start_with_the_data(tmp_path):
    f = tmp_path / "My Reviews.tsv.gz"
    f.write_bytes(b"")
    assert make_config().cache_path().startswith("cache/default-k4-float16-")
    assert make_config(dataset=str(f)).cache_path().startswith("cache/My-Reviews-k4-")
    assert make_config(dataset="glue/mrpc").cache_path().startswith("cache/glue-mrpc-k4-")
    assert make_config(dataset=str(f)).cache_path() != make_config(dataset=str(f), dataset_format="csv").cache_path()


def test_file_format_by_option_extension_or_sniffing(tmp_path):
    def fmt(name, text, **kw):
        p = tmp_path / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return file_format(make_config(dataset=str(p), **kw))

    assert fmt("a.tsv", "x") == "tsv" and fmt("a.jsonl", "x") == "json" and fmt("a.csv.bz2", "x") == "csv"
    assert fmt("pairs.txt", 'Quality\t#1 String\t#2 String\n1\the said "no, never\tok\n') == "tsv"
    assert fmt("rows.dat", "text,label\nhi,1\n") == "csv"
    assert fmt("rows.txt", '{"text": "a", "label": 1}\n') == "json"
    assert fmt("t.bin", b"PAR1\x00\x00") == "parquet"
    assert fmt("forced.txt", "text,label\n", dataset_format="tsv") == "tsv"
    with pytest.raises(PipelineError, match="--dataset-format csv|tsv|json|parquet"):
        fmt("prose.txt", "one line of prose\n")
    assert file_format(make_config(dataset="glue/mrpc")) is None  # not a file: the Hub loader


def _ds(values, column="label"):
    import datasets

    return datasets.Dataset.from_dict({column: values})


def test_labels_strings_ints_and_errors():
    ids, names = read_example_labels(_ds(["rotten", "fresh", "rotten"]), make_config(label_column="label"), numeric=False)
    assert ids.tolist() == [1, 0, 1] and names == ["fresh", "rotten"]
    ids, names = read_example_labels(_ds([2, 0, 1]), make_config(label_column="label"), numeric=False)
    assert ids.tolist() == [2, 0, 1] and names == ["0", "1", "2"]
    with pytest.raises(PipelineError, match="non-integer floats; use --task regression"):
        read_example_labels(_ds([0.5, 1.5]), make_config(label_column="label"), numeric=False)
    with pytest.raises(PipelineError, match="missing"):
        read_example_labels(_ds(["a", None]), make_config(label_column="label"), numeric=False)


def test_external_labels_map_onto_the_runs_classes(tmp_path):
    p = tmp_path / "test.csv"
    p.write_text("text,label\nnice,rotten\ngood,rotten\nbad,fresh\n")
    cfg = make_config(dataset=str(p), label_column="label", exclude_labels=None)
    _, ids = load_for_eval(cfg, ["rotten", "fresh", "plot"])  # the run's own order, not the file's
    assert ids.tolist() == [0, 0, 1]
    with pytest.raises(PipelineError, match=r"labels \['fresh'\] .* are not classes of the run"):
        load_for_eval(cfg, ["rotten", "meh"])


def test_split_is_stratified_fixed_and_disjoint():
    labels = np.array([0] * 80 + [1] * 20)
    cfg = make_config(val_fraction=0.1, test_fraction=0.1)
    a, b = split_indices(100, cfg, labels), split_indices(100, cfg, labels)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(100))
    assert labels[a["validation"]].sum() == 2 and labels[a["test"]].sum() == 2


def test_grid_points_union_without_duplicates_and_slugs():
    points = grid_points([{"k": [6, 5], "seed": [1, 2]}, {"k": [6], "seed": [1]}, {"stages": ["6,5"]}])
    assert points == [{"k": 6, "seed": 1}, {"k": 6, "seed": 2}, {"k": 5, "seed": 1}, {"k": 5, "seed": 2},
                      {"stages": "6,5"}]
    assert slug({"stages": "6,5,4", "lr": 1e-3}) == "lr=0.001_stages=6-5-4"


def test_pick_best_uses_the_metric_direction():
    rows = [{"val_accuracy": 0.8, "val_loss": 0.5}, {"val_accuracy": 0.9, "val_loss": 0.6},
            {"val_accuracy": float("nan"), "val_loss": 0.4}]
    assert pick_best(rows, make_config()) == 1
    assert pick_best(rows, make_config(metric_for_best="loss")) == 2


def test_trainer_state_round_trip_and_improvement_rule():
    cfg = make_config(metric_for_best="loss")
    s = TrainerState(epoch=3, step=40, batches_done=7, loss_sum=1.5, tokens=900, seconds=2.0)
    assert s.improved(cfg.best_metric(), {"loss": 0.7})
    s.best_metrics = {"loss": 0.7}
    assert s.improved(cfg.best_metric(), {"loss": 0.6}) and not s.improved(cfg.best_metric(), {"loss": 0.7})
    higher = TrainerState(best_metrics={"accuracy": 0.6})  # accuracy: higher is better
    best = make_config().best_metric()
    assert higher.improved(best, {"accuracy": 0.7}) and not higher.improved(best, {"accuracy": 0.6})
    assert TrainerState.from_json(s.to_json()) == s
    s.next_epoch(4)
    assert (s.epoch, s.batches_done, s.tokens, s.total_seconds) == (4, 0, 0, 2.0)
    nan = TrainerState(best_metrics={"accuracy": float("nan")})
    assert nan.improved(best, {"accuracy": 0.1})  # a NaN best is replaced by any number


def test_carry_over_shifts_layers_and_refuses_misfits():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    small = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=8, vocab_size=10))
    big = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=10))
    top = {n: t for n, t in small.state_dict().items() if "embeddings" not in n}
    carry_over(top, big, shift=2)
    assert torch.equal(big.state_dict()["bert.encoder.layer.2.output.dense.weight"],
                       small.state_dict()["bert.encoder.layer.0.output.dense.weight"])
    with pytest.raises(PipelineError, match="does not fit"):
        carry_over(top, big, shift=1)  # layer 0 of big would be missing without being expected


def test_metrics_and_bootstrap_intervals():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.where(rng.random(400) < 0.75, y, 1 - y)
    cls, reg = TASKS["classification"], TASKS["regression"]
    m = cls.metrics(Outputs(p, y, np.full(400, 0.5)), ["a", "b"])
    ci = cls.intervals(Outputs(p, y, np.full(400, 0.5)), ["a", "b"], resamples=200)
    assert m["loss"] == 0.5 and ci["accuracy"][0] < m["accuracy"] < ci["accuracy"][1]
    assert 0.03 < ci["accuracy"][1] - ci["accuracy"][0] < 0.15  # about 4 standard errors of a proportion
    t = rng.random(200)
    r = reg.metrics(Outputs(t + rng.normal(0, 0.1, 200), t, np.zeros(200)), None)
    assert set(r) == {"mse", "pearson", "spearman", "loss"} and r["pearson"] > 0.9
    assert cls.intervals(Outputs(p, y, np.zeros(400)), ["a", "b"], resamples=200) == ci  # a fixed seed


@pytest.mark.fast
def test_adapters_name_what_the_bottom_computes_with():
    from pipeline.arch import arch_for

    bert, deberta, qwen = arch_for("bert"), arch_for("deberta-v2"), arch_for("qwen3")
    for name in ("bert.embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight",
                 "bert.encoder.layer.1.output.dense.weight", "encoder.layer.0.attention.self.query.bias"):
        assert bert.is_frozen(name, 2), name  # with and without the base-model prefix
    assert not any(bert.is_frozen(n, 2) for n in ("bert.encoder.layer.2.output.dense.weight", "bert.pooler.dense.weight",
                                                  "classifier.weight"))
    shared = ("deberta.encoder.rel_embeddings.weight", "encoder.LayerNorm.weight", "deberta.encoder.conv.conv.weight")
    assert all(deberta.is_frozen(n, 1) for n in shared) and not any(deberta.is_frozen(n, 0) for n in shared)
    assert qwen.is_frozen("model.embed_tokens.weight", 0) and qwen.is_frozen("model.layers.3.mlp.up_proj.weight", 4)
    assert not any(qwen.is_frozen(n, 4) for n in ("model.norm.weight", "score.weight", "model.layers.4.q_norm.weight"))
    config = type("C", (), {"num_hidden_layers": 4, "layer_types": ["full", "sliding", "full", "sliding"]})()
    qwen.cut_config(config, 1, 4)
    assert config.num_hidden_layers == 3 and config.layer_types == ["sliding", "full", "sliding"]
    with pytest.raises(PipelineError, match="'gpt2' model; the bottom/top split supports: bert, camembert"):
        arch_for("gpt2", "m")
