"""The GPU check (`make gpu-check`): one command that proves the GPU code paths with real numbers, and fails loudly
(exit 1, the failed checks listed) on any mismatch.

Per shape (MiniLM default: the packaged all-MiniLM-L6-v2, k=4; bert-base: a randomly initialised 12-layer, hidden
768 encoder, k=10; qwen3-0.6b: a random Qwen3-0.6B-shaped decoder, 28 layers, k=26, opt-in):
  1. precompute on the device (pinned, asynchronous copies to the writer) into fp32, fp16 and bf16 caches; each is
     verified against the full model (`verify`: the stored hidden states within the dtype's tolerance, the logits
     within a bound), and the fp16 cache passes `check --recompute 64` (rows recomputed from their token ids);
  2. one training epoch in bf16 autocast and one in fp32 from the same cache: their validation losses at every
     evaluation agree within a bound;
  3. speed and memory (scripts/bench.py's methods): training tok/s against the top's own
     forward+backward on the same batches already on the device (the limit), precompute tok/s against a plain
     inference_mode forward of the bottom, and peak CUDA memory of training from the cache against the HF Trainer
     recipe with the same frozen layers at the same batch size (one fresh process; peaks reset between methods).
Writes OUT/gpu_check.json and OUT/gpu_check.md and prints the table.

Without a GPU, `make gpu-check` says so and exits 0. `--device cpu --quick` runs the same code on the CPU with small
sizes (the test suite does, so that it cannot rot); its figures are not GPU figures.

Usage: python scripts/gpu_check.py [--device cuda|cpu] [--quick] [--shapes minilm,bert-base[,qwen3-0.6b]]
                                   [--examples N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

# |logit| bounds of verify per cache dtype (the stored states are checked against the dtype's own rounding)
LOGIT_BOUND = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}
LOSS_BOUND = 0.05  # |validation loss, bf16 autocast - fp32| at every evaluation
SHAPES = {"minilm": 4, "bert-base": 10, "qwen3-0.6b": 26}  # k: the top 2 layers trained


def make_qwen3(folder: str) -> str:
    """A randomly initialised Qwen3-0.6B shape (28 layers, hidden 1024, 16 heads / 8 KV heads, vocab 151,936) with
    a small local tokenizer stand-in (the MiniLM WordPiece vocabulary): timing needs the shape, not the weights."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

    from pipeline.config import PACKAGED_MINILM
    from pipeline.model import resolve_model_path

    path = os.path.join(folder, "qwen3-0.6b-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=30522, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, pad_token_id=0,
                             max_position_embeddings=4096, tie_word_embeddings=True)
        Qwen3ForSequenceClassification(config).to(torch.bfloat16).save_pretrained(path)
        AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM)).save_pretrained(path)
    return path


def shape_config(shape: str, args, work: str):
    from bench import make_bert_base

    from pipeline import make_config
    from pipeline.config import PACKAGED_MINILM

    model = {"minilm": lambda: PACKAGED_MINILM, "bert-base": lambda: make_bert_base(work),
             "qwen3-0.6b": lambda: make_qwen3(work)}[shape]()
    return make_config("default", model=model, k=SHAPES[shape], max_examples=args.examples, epochs=1, batch_size=32, eval_every=max(1, args.examples // 160),
                       cache_dir=os.path.join(work, shape, "cache"), runs_dir=os.path.join(work, shape, "runs"),
                       cpu=args.device == "cpu", max_length=128)


def correctness(cfg, checks: list, row: dict) -> None:
    """Steps 1 and 2, in this process: precompute per cache dtype + verify, check --recompute, bf16 vs fp32."""
    from pipeline.errors import PipelineError
    from pipeline.precompute import precompute
    from pipeline.rundir import RunDir
    from pipeline.train import train
    from pipeline.verify import check, verify

    for dtype in ("float32", "float16", "bfloat16"):
        c = replace(cfg, cache_dtype=dtype)
        precompute(c, force=True)
        v = verify(c, samples=64)
        ok = v["hidden_within_tolerance"] and v["max_abs_logit_diff"] <= LOGIT_BOUND[dtype]
        row[f"verify_{dtype}"] = v["max_abs_logit_diff"]
        checks.append((f"verify {dtype} cache", ok, f"max_abs_logit_diff={v['max_abs_logit_diff']:.3g} "
                                                     f"(bound {LOGIT_BOUND[dtype]:g}), hidden states "
                                                     f"{'within' if v['hidden_within_tolerance'] else 'BEYOND'} "
                                                     f"{v['tolerance']}"))
    c16 = replace(cfg, cache_dtype="float16")
    try:
        check(c16, recompute=64)
        checks.append(("check --recompute 64 (fp16 cache)", True, "passed all checks"))
    except PipelineError as e:
        checks.append(("check --recompute 64 (fp16 cache)", False, str(e).splitlines()[0]))
    losses = {}
    for mp in ("no", "bf16"):
        train(replace(c16, mixed_precision=mp, run_name=f"mp-{mp}"))
        losses[mp] = [r["val_loss"] for r in RunDir(os.path.join(cfg.runs_dir, f"mp-{mp}")).metrics()]
    diff = max(abs(a - b) for a, b in zip(losses["no"], losses["bf16"]))
    row["bf16_vs_fp32_val_loss_diff"] = diff
    checks.append(("bf16 autocast vs fp32 training", diff <= LOSS_BOUND and len(losses["no"]) == len(losses["bf16"]),
                   f"validation losses at {len(losses['no'])} evaluations differ by at most {diff:.4f} "
                   f"(bound {LOSS_BOUND})"))


def _methods(cfg_dict: dict) -> dict:
    """bench.py's methods one after another in this (fresh) process, each with its own CUDA peak (reset between
    them; the caching allocator's reserve is not counted, only live tensors)."""
    os.chdir(ROOT)
    from bench import METHODS

    from pipeline import Config
    from pipeline.cli import quiet_libraries

    quiet_libraries()
    import torch

    cfg, out = Config.from_dict(cfg_dict), {}
    for name, c in (("ours_precompute", cfg), ("bottom_forward", cfg), ("ours_train", replace(cfg, run_name="speed")),
                    ("limit", cfg), ("baseline_trainer", cfg)):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out[name] = METHODS[name](c)
        if torch.cuda.is_available():
            out[name]["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def speed(cfg, row: dict) -> None:
    """Step 3, in one fresh process (scripts/bench.py's methods): training and precompute against their limits,
    CUDA memory of training from the cache against the HF Trainer recipe at the same batch."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    c16 = replace(cfg, cache_dtype="float16", eval_every=0)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        r = pool.submit(_methods, c16.to_dict()).result()
    row.update(precompute_tok_s=r["ours_precompute"]["loop_tokens_per_s"],
               bottom_forward_tok_s=r["bottom_forward"]["tokens_per_s"], train_tok_s=r["ours_train"]["tokens_per_s"],
               limit_tok_s=r["limit"]["tokens_per_s"], hf_trainer_tok_s=r["baseline_trainer"]["tokens_per_s"])
    row["train_vs_limit"] = row["train_tok_s"] / row["limit_tok_s"]
    row["precompute_vs_forward"] = row["precompute_tok_s"] / row["bottom_forward_tok_s"]
    if "cuda_peak_mb" in r["ours_train"]:
        row.update(train_peak_mb=r["ours_train"]["cuda_peak_mb"], hf_trainer_peak_mb=r["baseline_trainer"]["cuda_peak_mb"])
        row["memory_vs_hf_trainer"] = row["train_peak_mb"] / row["hf_trainer_peak_mb"]


def markdown(rows: list, checks: list, meta: dict) -> str:
    lines = [f"GPU check: {meta['device']}, {meta['date']}, {meta['examples']} examples per shape"
             f"{' (--quick: not GPU figures)' if meta['quick'] else ''}.", "",
             "| shape | verify fp32 / fp16 / bf16 (max abs logit diff) | bf16 vs fp32 val loss | train tok/s (vs limit) "
             "| precompute tok/s (vs plain forward) | memory: ours vs HF Trainer |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} (k={r['k']}) | {r['verify_float32']:.2g} / {r['verify_float16']:.2g} / "
                     f"{r['verify_bfloat16']:.2g} | {r['bf16_vs_fp32_val_loss_diff']:.4f} | "
                     f"{r['train_tok_s']:,.0f} ({r['train_vs_limit']:.2f}x of {r['limit_tok_s']:,.0f}) | "
                     f"{r['precompute_tok_s']:,.0f} ({r['precompute_vs_forward']:.2f}x of "
                     f"{r['bottom_forward_tok_s']:,.0f}) | " + (
                         f"{r['train_peak_mb']:,.0f} vs {r['hf_trainer_peak_mb']:,.0f} MiB CUDA peak "
                         f"({r['memory_vs_hf_trainer']:.2f}x)" if "train_peak_mb" in r else "n/a (no CUDA)") + " |")
    lines += ["", "| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {name} | {'ok' if ok else '**FAILED**'} | {detail.replace('|', chr(92) + '|')} |"
              for name, ok, detail in checks]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is a GPU")
    ap.add_argument("--quick", action="store_true", help="small sizes (the test suite's CPU run)")
    ap.add_argument("--shapes", default="minilm,bert-base")
    ap.add_argument("--examples", type=int, default=4000, help="examples per shape (train + validation + test)")
    ap.add_argument("--out", default="cache/gpu-check")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # every step, bench.py's methods included, on the CPU even where there is a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device is None:
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU on this machine, nothing to check (exit 0). On a machine with one, "
                  "`make gpu-check` proves the GPU paths in minutes; `python scripts/gpu_check.py --device cpu "
                  "--quick` runs the same code here.")
            return 0
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    if args.quick:
        args.examples = min(args.examples, 160)
    from pipeline.cli import quiet_libraries

    quiet_libraries()
    work = os.path.join(ROOT, args.out)
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        print(f"error: unknown --shapes {unknown}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    rows, checks = [], []
    for shape in shapes:
        cfg = shape_config(shape, args, work)
        shutil.rmtree(cfg.runs_dir, ignore_errors=True)  # this check's runs, from an earlier call
        row = {"shape": shape, "k": cfg.k}
        shape_checks = []
        correctness(cfg, shape_checks, row)
        speed(cfg, row)
        checks += [(f"{shape}: {name}", ok, detail) for name, ok, detail in shape_checks]
        rows.append(row)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()}, "
            f"{os.cpu_count()} cores)", "date": time.strftime("%Y-%m-%d"), "examples": args.examples,
            "quick": args.quick, "seconds": time.time() - t0, "torch": torch.__version__}
    md = markdown(rows, checks, meta)
    with open(os.path.join(work, "gpu_check.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows, "checks": [dict(name=n, ok=o, detail=d) for n, o, d in checks]}, fh,
                  indent=2)
    with open(os.path.join(work, "gpu_check.md"), "w") as fh:
        fh.write(md)
    print(md)
    failed = [n for n, ok, _ in checks if not ok]
    print(f"gpu-check: {len(checks) - len(failed)} of {len(checks)} checks passed in {meta['seconds']:.0f} s -> "
          f"{work}/gpu_check.md")
    if failed:
        print("gpu-check FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
