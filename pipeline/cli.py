"""Command line: python -m pipeline {precompute,train,verify,check,sweep} [--preset NAME] [--config FILE] [--<option> V]
              python -m pipeline evaluate --run RUN_DIR [--split test|validation] [--dataset FILE]
              python -m pipeline export --run RUN_DIR [--out DIR]
              python -m pipeline predict --model-dir DIR [TEXT ...] [--text-pair P ...] [--file F]

Every Config field is an option (`--lr 1e-4`, `--k 3`, `--text-pair-column hypothesis`); values are validated once
when the Config is built. Bad input exits with status 2 and a one-paragraph message, never a library traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import MISSING, fields

from .config import COMMAND_GROUPS, OPTION_GROUPS, PRESETS, Config, literal_choices, make_config
from .errors import PipelineError
from .fsutil import read_json


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _optional_str(v: str):
    return None if v.lower() in ("none", "") else v


_TYPES = {"int": int, "float": float, "str": str, "bool": _bool, "Optional[str]": _optional_str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("precompute", "run the frozen bottom once and write the HDF5 cache"),
                        ("train", "fine-tune the top layers + head from the cache"),
                        ("verify", "compare full-model logits with cache + top on real cached examples"),
                        ("check", "validate a cache file: structure, checksums, finite values; optionally recompute "
                                  "a sample of rows"),
                        ("sweep", "run a grid of trainings (lr, seed, depth, strategy) from one cache; table + plot"),
                        ("search", "hyperparameter search with pruning (Optuna) from one multi-depth cache")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--preset", default="default", help=f"one of: {', '.join(PRESETS)}")
        p.add_argument("--config", help="JSON file of Config fields (applied after the preset, before options)")
        if name == "precompute":
            p.add_argument("--force", action="store_true",
                           help="rebuild the cache even if an up-to-date one exists, or if its inputs changed")
            p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                           help="if another process is writing the same cache, wait at most this long "
                                "(default: wait until it is done; 0: fail at once)")
        else:
            p.add_argument("--cache", help="use this cache file instead of the one derived from the config")
        if name == "search":
            p.add_argument("--space", required=True, help="JSON search space: {\"name\", \"base\": {fixed options}, "
                                                          "\"space\": {field: {\"type\": float|int|categorical, ...}}}")
            p.add_argument("--trials", type=int, default=10, help="finished trials the study should hold in all")
            p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop starting trials after S s")
            p.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe", help="seeded by --seed")
            p.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
            p.add_argument("--storage", default=None, metavar="URL",
                           help="Optuna storage URL (default: sqlite:///<runs-dir>/<study>.db)")
            p.add_argument("--study-name", default=None, help="default: the space file's name")
            p.add_argument("--jobs", type=int, default=1, metavar="N",
                           help="worker processes on this machine against the one study (a share of the CPU cores "
                                "each, or one GPU each); other machines run the same command with the same "
                                "--storage and --study-name")
        if name == "sweep":
            p.add_argument("--grid", required=True, help="JSON grid file (see sweeps/default.json)")
            p.add_argument("--jobs", type=int, default=1, metavar="N",
                           help="worker processes, each running one grid point at a time (one GPU each, or a share "
                                "of the CPU cores)")
            p.add_argument("--storage", default=None, metavar="URL",
                           help="Optuna storage URL (default: sqlite:///<runs-dir>/<name>/study.db)")
        if name in ("search", "sweep"):
            p.add_argument("--heartbeat", type=int, default=60, metavar="S",
                           help="database storages: a running trial beats every S s; one silent for 2 beats (its "
                                "worker died) is failed and retried from its checkpoint")
            p.add_argument("--worker", type=int, default=0, metavar="N",
                           help="this worker's number, added to the sampler's seed so that workers do not draw the "
                                "same values (--jobs numbers its own; give each further machine its own N)")
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue the run --run-name from its last checkpoint (same config required)")
        if name == "verify":
            p.add_argument("--samples", type=int, default=64, help="cached examples to check")
        if name == "check":
            p.add_argument("--recompute", type=int, default=0, metavar="N",
                           help="also recompute N cached validation rows from their token ids with the model and "
                                "compare (default 0: file checks only)")
        shown = COMMAND_GROUPS.get(name, tuple(OPTION_GROUPS))
        where = " (shared by every run; the grid file's base and grid values override them)" if name == "sweep" else ""
        for group, names in OPTION_GROUPS.items():
            _config_options(p.add_argument_group(f"{group} options{where}") if group in shown else p, names,
                            hidden=group not in shown)
    p = sub.add_parser("evaluate", help="score a finished run on a cached split (test by default) or on a labeled "
                                        "file, with bootstrap 95%% confidence intervals")
    p.add_argument("--run", required=True, help="run directory (cache/runs/<name>)")
    p.add_argument("--split", default="test", help="cached split to score: test (default) or validation")
    p.add_argument("--dataset", help="score this labeled file instead (through the frozen bottom + the top); the "
                                     "column options default to the run's")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    p.add_argument("--save-predictions", action="store_true",
                   help="also write <run>/predictions_<split or file>.csv: example, label, prediction, loss")
    _config_options(p.add_argument_group("options for --dataset (default: the run's)"), EVAL_DATA_OPTIONS)
    p = sub.add_parser("export", help="merge the frozen bottom and a run's trained top into one Hugging Face folder")
    p.add_argument("--run", required=True, help="run directory (cache/runs/<name>)")
    p.add_argument("--out", help="output folder (default: <run>/export)")
    p = sub.add_parser("predict", help="classify raw texts with an exported folder or a run directory")
    p.add_argument("--model-dir", required=True, help="exported model folder, or a run directory")
    p.add_argument("texts", nargs="*", help="texts to classify (default: --file, else one per line on stdin)")
    p.add_argument("--text-pair", action="append", metavar="TEXT",
                   help="the second text of a pair, once per text (pair models: NLI, paraphrase)")
    p.add_argument("--file", help="a text file: one text per line, or text<TAB>pair per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--entities", action="store_true",
                   help="token models: print each entity span (type, first word, last word, text, mean "
                        "probability) instead of a tag per word")
    return parser


EVAL_DATA_OPTIONS = ["dataset_format", "text_column", "text_pair_column", "label_column", "exclude_labels"]


def _config_options(group, names, hidden: bool = False) -> None:
    """One --option per Config field: its type, its Literal choices, its help and default (hidden: accepted, not
    shown in --help)."""
    by_name, choices = {f.name: f for f in fields(Config)}, literal_choices()
    for name in names:
        f = by_name[name]
        default = f.default if f.default is not MISSING else None
        kind = "str" if name in choices else str(f.type)
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=_TYPES[kind], choices=choices.get(name),
                           default=argparse.SUPPRESS, metavar=None if name in choices else kind.upper().replace(
                               "OPTIONAL[STR]", "STR"),
                           help=argparse.SUPPRESS if hidden else f"{f.metadata.get('help', '')} (default: {default})")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {}
    if args.config:
        overrides.update(read_json(args.config, "--config"))
    overrides.update({f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)})
    overrides.pop("preset", None)
    return make_config(args.preset, **overrides)


def quiet_libraries() -> None:
    """transformers 5 prints load reports and progress bars; datasets prints progress bars. Keep the CLI clean."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        if args.command == "export":
            from .export import export

            export(args.run, args.out)
            return
        if args.command == "predict":
            from .export import predict, read_texts

            texts, pairs = read_texts(args.texts, args.file, args.text_pair)
            task, results = predict(args.model_dir, texts, pairs, args.batch_size)
            for i, result in enumerate(results):
                shown = texts[i] if pairs is None else f"{texts[i]}\t{pairs[i]}"
                print(task.format(result, shown, args.entities))
            return
        if args.command == "evaluate":
            from .evaluate import evaluate_run

            overrides = {n: getattr(args, n) for n in EVAL_DATA_OPTIONS if hasattr(args, n)}
            if overrides and not args.dataset:
                raise PipelineError(f"--{', --'.join(n.replace('_', '-') for n in overrides)} only apply with "
                                    f"--dataset FILE.")
            evaluate_run(args.run, args.split, args.dataset, overrides, args.resamples, args.batch_size,
                         args.save_predictions)
            return
        cfg = config_from_args(args)
        if args.command == "precompute":
            from .precompute import precompute

            precompute(cfg, force=args.force, lock_timeout=args.lock_timeout)
        elif args.command == "train":
            from .train import train

            train(cfg, cache_path=args.cache, resume=args.resume)
        elif args.command == "sweep":
            from .sweep import sweep

            if args.jobs < 1 or args.heartbeat < 1:
                raise PipelineError(f"--jobs {args.jobs} and --heartbeat {args.heartbeat}: give 1 or more.")
            sweep(cfg, args.grid, args.jobs, args.storage, args.heartbeat, args.worker)
        elif args.command == "search":
            from .search import search

            if args.trials < 1 or args.jobs < 1 or args.heartbeat < 1:
                raise PipelineError(f"--trials {args.trials}, --jobs {args.jobs} and --heartbeat {args.heartbeat}: "
                                    f"give 1 or more.")
            search(cfg, args.space, args.trials, args.timeout, args.sampler, args.pruner, args.storage,
                   args.study_name, args.jobs, args.heartbeat, args.worker)
        elif args.command == "verify":
            from .verify import verify

            verify(cfg, cache_path=args.cache, samples=args.samples)
        else:
            from .verify import check

            check(cfg, cache_path=args.cache, recompute=args.recompute)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
