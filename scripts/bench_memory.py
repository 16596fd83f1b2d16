"""Peak memory of training the top 2 layers: from the cache (ours) vs the usual recipe (HF Trainer on the full model,
bottom requires_grad=False), at two large shapes built here with random bf16 weights:
  xlmr-large   an xlm-roberta-large-shaped encoder (24 layers, hidden 1024, vocabulary 250,002; 560M parameters)
  qwen3-1.7b   a Qwen3-1.7B-shaped decoder (28 layers, hidden 2048, GQA 16/8 heads, vocabulary 151,936; 1.7B)
Each checkpoint is saved the way the real one is (a masked-LM / causal-LM folder without a classification head,
safetensors, bf16). Each measurement runs in its own fresh process; the figure is the peak RSS (VmHWM) above the
RSS after the imports, so both sides pay the same library baseline. Ours' precompute runs first, into a fresh cache
folder (its peak is reported too, but the issue compares training). Same data (the default corpus), batch size,
steps and dtype. Peak RSS moves by a few tens of MiB between identical runs (allocator timing): every method runs
--repeats times, alternating, and the table gives the median with the range.
The fixed glibc mmap threshold that both sides are also measured with costs page faults: --speed-steps N (default
150) times N training steps of the default run (MiniLM, 2 trained layers, from the default cache) with and without
it, alternating --repeats times, each a fresh `python -m pipeline train` process (0 skips it).

Usage:  python scripts/bench_memory.py [--shapes xlmr-large,qwen3-1.7b] [--samples 192] [--steps 4] [--repeats 3]
                                       [--speed-steps 150] [--batch-size 8] [--max-length 64] [--out cache/bench-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "xlmr-large": ("xlm-roberta", "XLMRobertaForMaskedLM", dict(
        vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)),
    "qwen3-1.7b": ("qwen3", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=6144, max_position_embeddings=40960, tie_word_embeddings=True,
        pad_token_id=0)),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent across exec."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024  # KiB


def build(shape: str, folder: str) -> None:
    """A random bf16 checkpoint of the shape, with the packaged MiniLM tokenizer (its ids fit both vocabularies)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.config import PACKAGED_MINILM
    from pipeline.model import resolve_model_path

    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    model_type, cls, kw = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = getattr(transformers, cls)(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM)).save_pretrained(folder)
    print(f"built {shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {folder}",
          flush=True)


def config_for(args, shape: str):
    from pipeline import make_config

    model_type = SHAPES[shape][0]
    k = SHAPES[shape][2]["num_hidden_layers"] - 2
    return make_config("default", model=os.path.join(args.out, shape), k=k, max_examples=args.samples,
                       max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                       precompute_batch_size=16, max_steps=args.steps, epochs=1, checkpoint_every=-1,
                       cache_dir=os.path.join(args.out, "cache", shape), runs_dir=os.path.join(args.out, "runs"),
                       cache_dtype="bfloat16" if model_type == "qwen3" else "float16", cpu=True)


def usual(cfg) -> dict:
    """HF Trainer on the full model, what the bottom computes with frozen (embeddings + layers [0, k))."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from pipeline.arch import arch_for
    from pipeline.data import load_labeled
    from pipeline.model import load_full_model, load_tokenizer

    data = load_labeled(cfg)
    tok = load_tokenizer(cfg)
    idx = data.splits["train"]
    enc = tok(*data.texts_at(idx), truncation=True, max_length=cfg.max_length)
    ds = Dataset.from_dict({**{k: enc[k] for k in enc}, "labels": [int(data.labels[i]) for i in idx]})
    model = load_full_model(cfg, len(data.label_names), data.label_names)
    arch = arch_for(model.config.model_type)
    for name, p in model.named_parameters():
        p.requires_grad_(not arch.is_frozen(name, cfg.k))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = TrainingArguments(output_dir=os.path.join(cfg.runs_dir, "trainer"), per_device_train_batch_size=cfg.batch_size,
                             learning_rate=cfg.lr, max_steps=cfg.max_steps, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=cfg.seed)
    t0 = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok)).train()
    return {"seconds": time.perf_counter() - t0, "trainable_params": trainable,
            "dtype": str(next(model.parameters()).dtype), "bytes_per_param": next(model.parameters()).element_size(),
            "params": sum(p.numel() for p in model.parameters())}


def ours_precompute(cfg) -> dict:
    from pipeline.precompute import precompute

    t0 = time.perf_counter()
    path = precompute(cfg)
    return {"seconds": time.perf_counter() - t0, "cache_mb": os.path.getsize(path) / 2**20}


def ours_train(cfg) -> dict:
    from pipeline.train import train

    t0 = time.perf_counter()
    r = train(cfg)
    results = json.load(open(os.path.join(r["run_dir"], "results.json")))
    return {"seconds": time.perf_counter() - t0, "trainable_params": results["trainable_params"]}


METHODS = {"usual": usual, "ours_precompute": ours_precompute, "ours_train": ours_train}


def child(method: str, cfg_json: str) -> None:
    from pipeline.cli import quiet_libraries

    quiet_libraries()
    import torch  # the baseline includes every library both sides import
    import transformers  # noqa: F401
    import accelerate  # noqa: F401
    import datasets  # noqa: F401

    from pipeline import Config
    import pipeline.precompute  # noqa: F401
    import pipeline.train  # noqa: F401

    cfg = Config.from_dict(json.loads(cfg_json))
    torch.set_flush_denormal(True)  # random deep bf16 stacks on a CPU: denormals would dominate the time (both sides)
    base = rss_mb()
    result = METHODS[method](cfg)
    result.update(rss_after_imports_mb=base, peak_rss_mb=peak_mb(), growth_mb=peak_mb() - base)
    print("RESULT " + json.dumps(result), flush=True)


# glibc's default raises its mmap threshold each time a large block is freed (up to 32 MiB), after which freed
# activation and gradient blocks stay in the heap and the next step's differently sized ones land beside them; a
# fixed threshold returns every block >= 1 MiB to the system when it is freed (at a cost in page faults)
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
# (row key, method, extra environment): every row is a fresh process
RUNS = (("ours_precompute", "ours_precompute", {}), ("ours_train", "ours_train", {}), ("usual", "usual", {}),
        ("ours_train_fixed_mmap", "ours_train", FIXED_MMAP), ("usual_fixed_mmap", "usual", FIXED_MMAP))


def measure(method: str, cfg, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", method, cfg.to_json()], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **env})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{method} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(line[-1][7:])


def summary(results: list) -> dict:
    """The median run of one method (by peak growth), with every run's growth."""
    growths = [r["growth_mb"] for r in results]
    median = statistics.median_low(growths)
    return {**results[growths.index(median)], "growth_runs_mb": growths}


def allocator_speed(args) -> dict:
    """train_seconds of --speed-steps steps of the default run with glibc's default and with FIXED_MMAP."""
    from pipeline.rundir import RunDir

    runs_dir = os.path.join(args.out, "speed-runs")
    shutil.rmtree(runs_dir, ignore_errors=True)
    # the default cache is built (or found) untimed
    subprocess.run([sys.executable, "-m", "pipeline", "precompute"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = {"default": [], "fixed_mmap": []}
    for i in range(args.repeats):
        for key, env in (("default", {}), ("fixed_mmap", FIXED_MMAP)):
            name = f"{key}-{i}"
            subprocess.run([sys.executable, "-m", "pipeline", "train", "--max-steps", str(args.speed_steps),
                            "--epochs", "1", "--run-name", name, "--runs-dir", runs_dir], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
            seconds[key].append(RunDir(os.path.join(runs_dir, name)).metrics()[-1]["train_seconds"])
    return seconds


def fixed(row: dict, key: str) -> str:
    return f"{row[key + '_fixed_mmap']['growth_mb']:.0f} MiB ({row[key + '_fixed_mmap']['seconds']:.1f} s vs " \
           f"{row[key]['seconds']:.1f} s)"


def span(s: dict) -> str:
    runs = s["growth_runs_mb"]
    return f"{s['growth_mb']:.0f} MiB ({min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else f"{s['growth_mb']:.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="xlmr-large,qwen3-1.7b")
    p.add_argument("--samples", type=int, default=192)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speed-steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", default=os.path.join(ROOT, "cache", "bench-memory"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        build(shape, os.path.join(args.out, shape))
        runs = {key: [] for key, _, _ in RUNS}
        for _ in range(args.repeats):
            cfg = config_for(args, shape)
            shutil.rmtree(cfg.cache_dir, ignore_errors=True)  # precompute really runs every time
            for key, method, env in RUNS:
                runs[key].append(measure(method, replace(cfg, run_name=f"{shape}-{key}-{time.time_ns()}"), env))
        row = {"shape": shape, **{m: summary(r) for m, r in runs.items()}}
        row["ratio"] = row["ours_train"]["growth_mb"] / row["usual"]["growth_mb"]
        row["ratios"] = [o["growth_mb"] / u["growth_mb"] for o, u in zip(runs["ours_train"], runs["usual"])]
        row["ratio_fixed_mmap"] = row["ours_train_fixed_mmap"]["growth_mb"] / row["usual_fixed_mmap"]["growth_mb"]
        row["ratio_fixed_mmap_vs_usual"] = row["ours_train_fixed_mmap"]["growth_mb"] / row["usual"]["growth_mb"]
        # what any exact method holds for the trained parameters: weights, gradients and AdamW's two moments
        row["floor_mb"] = 4 * row["usual"]["trainable_params"] * row["usual"]["bytes_per_param"] / 2**20
        rows.append(row)
        base, ours, pre = row["usual"], row["ours_train"], row["ours_precompute"]
        print(f"{shape}: usual recipe {base['growth_mb']:.0f} MiB above imports ({base['seconds']:.0f} s, "
              f"{base['trainable_params'] / 1e6:.1f}M trainable of {base['params'] / 1e6:.0f}M, {base['dtype']}); "
              f"ours' training {ours['growth_mb']:.0f} MiB ({ours['seconds']:.0f} s, "
              f"{ours['trainable_params'] / 1e6:.1f}M trainable) = {row['ratio']:.1%} of it (runs: "
              f"{', '.join(f'{r:.1%}' for r in row['ratios'])}; floor {row['floor_mb']:.0f} MiB = "
              f"{row['floor_mb'] / base['growth_mb']:.1%}); ours' precompute "
              f"{pre['growth_mb']:.0f} MiB ({pre['seconds']:.0f} s, cache {pre['cache_mb']:.1f} MiB); with "
              f"MALLOC_MMAP_THRESHOLD_={FIXED_MMAP['MALLOC_MMAP_THRESHOLD_']}: ours {fixed(row, 'ours_train')}, "
              f"usual {fixed(row, 'usual')}: {row['ratio_fixed_mmap']:.1%}", flush=True)
    speed = allocator_speed(args) if args.speed_steps else None
    info = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "samples": args.samples, "steps": args.steps, "batch_size": args.batch_size,
            "max_length": args.max_length, "repeats": args.repeats, "rows": rows, "allocator_speed": speed}
    with open(os.path.join(args.out, "bench_memory.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    print("| shape | usual recipe: peak RSS above imports | ours, training from the cache | ratio of the medians "
          "(each run's) | floor: trained weights + grads + AdamW moments | ours' precompute |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {span(r['usual'])} | {span(r['ours_train'])} | {r['ratio']:.1%} "
              f"({', '.join(f'{x:.1%}' for x in r['ratios'])}) | {r['floor_mb']:.0f} MiB "
              f"({r['floor_mb'] / r['usual']['growth_mb']:.1%}) | {span(r['ours_precompute'])} |")
    print(f"\nBoth sides with MALLOC_MMAP_THRESHOLD_={FIXED_MMAP['MALLOC_MMAP_THRESHOLD_']} (fixed glibc mmap threshold):")
    print("| shape | usual recipe | ours, training from the cache | ratio | ours vs the usual recipe's default |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {span(r['usual_fixed_mmap'])} | {span(r['ours_train_fixed_mmap'])} | "
              f"{r['ratio_fixed_mmap']:.1%} | {r['ratio_fixed_mmap_vs_usual']:.1%} |")
    if speed:
        a, b = statistics.median(speed["default"]), statistics.median(speed["fixed_mmap"])
        print(f"\nThe default run, {args.speed_steps} training steps: glibc's default "
              f"{', '.join(f'{x:.2f}' for x in speed['default'])} s, fixed mmap threshold "
              f"{', '.join(f'{x:.2f}' for x in speed['fixed_mmap'])} s: {b / a - 1:+.0%} time (medians)")


if __name__ == "__main__":
    main()
