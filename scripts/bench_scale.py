"""Scale benchmark: 1x/10x/100x corpora, measured side by side in one run against this machine's own limits.

Builds the corpora locally (the default Rotten Tomatoes corpus repeated, each copy with a distinct suffix), then:
  precompute  MiniLM `--k 0` at each size in a fresh process: peak RSS, loop tok/s and MB/s against the disk's
              sequential write bandwidth (the same bytes, capped at --write-cap-gb, written + fdatasync here)
  nproc       precompute of the middle size with 2 processes (torchrun) against 1
  reader      the training data path without a model (make_loader: batch sampler + one-step memmap gather) at
              hidden 384 (MiniLM) and 768 (a 1-layer random BERT of width 768 built here), from the page cache,
              against memcpy; 1 and 2 concurrent reader processes
  cold        the largest MiniLM cache evicted from the page cache (posix_fadvise DONTNEED): sequential read of the
              file, then the reader in training order and in storage order, against that read bandwidth
  rss_anon    a short training at each size: peak RssAnon (the process's own memory; the mapped cache is RssFile)
  head_only   end-to-end training of the width-768 model's head only (`--k 1` of 1 layer) at batch 256 and 32

Usage:  python scripts/bench_scale.py [--sizes 1,10,100] [--work DIR] [--out DIR]
Writes OUT/bench_scale.json and OUT/bench_scale.md (default OUT: WORK) and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
CORPUS = os.path.join(ROOT, "cache", "data", "rotten_tomatoes_corpus_full.csv.bz2")

# Runs the CLI in this child process and reports its peak RSS and peak RssAnon (sampled every 50 ms).
WRAP = r"""
import json, resource, sys, threading, time
peak = [0]
def watch():
    while True:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
report, sys.argv = sys.argv[1], ["pipeline"] + sys.argv[2:]
from pipeline.cli import main
try:
    main()
finally:
    with open(report, "w") as fh:
        json.dump({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                   "peak_rss_anon_mb": peak[0] / 1024}, fh)
"""


def cli(work, *args, nproc=1) -> tuple[dict, str, float]:
    """(memory report, stdout, wall seconds) of `python -m pipeline ARGS` in a fresh process (or torchrun)."""
    report = os.path.join(work, "report.json")
    if nproc == 1:
        cmd = [PY, "-c", WRAP, report, *map(str, args)]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "pipeline", *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    mem = json.load(open(report)) if nproc == 1 else {}
    return mem, proc.stdout, wall


def make_corpus(work: str, times: int) -> str:
    """The default corpus (fresh/rotten rows) repeated `times` times, copy r's texts suffixed with ' (r)'."""
    path = os.path.join(work, "data", f"rt_x{times}.csv")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with bz2.open(CORPUS, "rt", encoding="utf-8") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    with open(path + ".part", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "category"])
        for r in range(times):
            w.writerows((f"{t} ({r})" if r else t, c) for t, c in rows)
    os.replace(path + ".part", path)
    return path


def disk_write_mbps(work: str, nbytes: int) -> float:
    """Sequential write of nbytes (8 MiB blocks of random bytes) + fdatasync: what `dd conv=fdatasync` measures."""
    block = os.urandom(8 << 20)
    path = os.path.join(work, "dd.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    try:
        for _ in range(max(1, nbytes // len(block))):
            os.write(fd, block)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    secs = time.perf_counter() - t0
    os.remove(path)
    return max(1, nbytes // len(block)) * len(block) / secs / 1e6


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read_mbps(path: str) -> float:
    evict(path)
    t0, n = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 << 20)
        while True:
            k = fh.readinto(buf)
            if not k:
                break
            n += k
    return n / (time.perf_counter() - t0) / 1e6


def memcpy_gbps() -> float:
    import numpy as np

    a = np.ones(1 << 28, dtype=np.uint8)
    b = np.empty_like(a)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


# The loop's two halves alone, on the loop's own batches: the bottom's forward (+ the cast to fp16 on the device)
# without writing, and the writer thread fed the same bytes without a model.
HALVES = r"""
import json, os, sys, time, torch
sys.path.insert(0, sys.argv[1])
from pipeline.cli import quiet_libraries; quiet_libraries()
from pipeline.config import make_config
from pipeline.model import load_bottom
from pipeline.precompute import _Writer, _batches, _inputs
path, scratch, model = sys.argv[2], sys.argv[3], sys.argv[4]
batches, layout = _batches(path)
bottom = load_bottom(make_config("default", k=0, model=model) if model != "-" else make_config("default", k=0))
shapes, tokens, t0 = [], 0, time.perf_counter()
with torch.inference_mode():
    for b in batches:
        x = _inputs(layout, b)
        rows = bottom(**x).last_hidden_state[x["attention_mask"].bool()].to(torch.float16)
        shapes.append(rows.shape)
        tokens += rows.shape[0]
forward_s = time.perf_counter() - t0
fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
pool = [torch.randn(max(s[0] for s in shapes), shapes[0][1]).half() for _ in range(6)]
writer, at, t0 = _Writer(fd, 0, 5.0, 256 << 20), 4 * len(batches), time.perf_counter()
for i, (n, h) in enumerate(shapes):
    writer.put([(pool[i % 6][:n], None, at)], i, 1)
    at += n * h * 2
writer.close()
write_s = time.perf_counter() - t0
os.close(fd); os.remove(scratch)
print(json.dumps({"forward_tok_s": tokens / forward_s, "writer_MBps": (at - 4 * len(batches)) / write_s / 1e6}))
"""

READER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from pipeline.cache import CachedSplit
from pipeline.config import make_config
from pipeline.train import make_loader
path, depth, bs, shuffle, seconds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", float(sys.argv[6])
max_tokens, in_memory = int(sys.argv[7]), sys.argv[8] == "1"
ds = CachedSplit(path, "train", depth, in_memory=in_memory, reuse_buffers=True)
cfg = make_config("default", batch_size=bs)
loader = make_loader(ds, cfg, shuffle, False, torch.Generator().manual_seed(0))
if not shuffle:  # storage order: the batch sampler without shuffling
    loader.batch_sampler.shuffle = False
tokens, t0, epochs = 0, time.perf_counter(), 0
while time.perf_counter() - t0 < seconds:  # whole passes (a new order each) until `seconds`, or part of one
    epochs += 1
    loader.generator.manual_seed(epochs)
    for batch in loader:
        tokens += int(batch["attention_mask"].sum())
        if time.perf_counter() - t0 > seconds or tokens >= max_tokens:
            break
    if tokens >= max_tokens:
        break
secs = time.perf_counter() - t0
anon = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon:")][0]
print(json.dumps({"tokens": tokens, "seconds": secs, "tok_s": tokens / secs, "rss_anon_mb": anon / 1024}))
"""


def reader(path: str, depth: int, bs: int, shuffle: bool = True, seconds: float = 20.0, procs: int = 1,
           max_tokens: int = 1 << 62, in_memory: bool = False) -> dict:
    """The data path alone, in `procs` concurrent fresh processes (passes until `seconds` or `max_tokens`)."""
    cmd = [PY, "-c", READER, ROOT, path, str(depth), str(bs), "1" if shuffle else "0", str(seconds),
           str(max_tokens), "1" if in_memory else "0"]
    running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in running]
    return {"tok_s_per_process": [round(o["tok_s"]) for o in outs], "tok_s_total": round(sum(o["tok_s"] for o in outs)),
            "seconds": max(o["seconds"] for o in outs), "rss_anon_mb": max(o["rss_anon_mb"] for o in outs)}


def make_wide_model(work: str) -> str:
    """A 1-layer random BERT of width 768 (bert-base's width) with the packaged tokenizer."""
    path = os.path.join(work, "bert-768-1layer")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.config import PACKAGED_MINILM
    from pipeline.model import resolve_model_path

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(num_hidden_layers=1)).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM)).save_pretrained(path)
    return path


def cache_file(cache_dir: str) -> str:
    (name,) = [n for n in os.listdir(cache_dir) if n.endswith(".h5")]
    return os.path.join(cache_dir, name)


def stats(path: str) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        s = json.loads(f.attrs["stats_json"])
        s["hidden_bytes"] = sum(f[f"{sp}/layer_{d}/hidden"].nbytes for sp in json.loads(f.attrs["splits_json"])
                                for d in json.loads(f.attrs["depths_json"]))
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,10,100", help="corpus multiples (the last one is the 'larger than RAM' one)")
    ap.add_argument("--work", default=os.path.join(ROOT, "cache", "bench-scale"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--write-cap-gb", type=float, default=8.0, help="cap of the disk-write reference's bytes")
    ap.add_argument("--wide-size", type=int, default=10, help="corpus multiple for the width-768 caches")
    ap.add_argument("--parts", default="precompute,nproc,reader,cold,rss,head_only",
                    help="which measurements (cold needs precompute's largest cache, rss its caches)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = set(args.parts.split(","))
    mid = sizes[min(1, len(sizes) - 1)]
    work, out_dir = args.work, args.out or args.work
    os.makedirs(work, exist_ok=True)
    wide = make_wide_model(work)
    wdir = os.path.join(work, f"bert768-x{args.wide_size}")
    wdata = make_corpus(work, args.wide_size)
    import h5py
    import psutil

    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                      f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "precompute": {}, "reader": {},
           "rss_anon": {}}
    res["memcpy_GBps"] = memcpy_gbps()
    print(f"memcpy {res['memcpy_GBps']:.1f} GB/s", flush=True)
    common = ["--label-column", "category", "--max-length", "128"]

    if "precompute" in parts:
        # --- precompute at each size (MiniLM --k 0) against the disk's write bandwidth
        for n in sizes:
            data = make_corpus(work, n)
            cdir = os.path.join(work, f"minilm-x{n}")
            shutil.rmtree(cdir, ignore_errors=True)  # a fresh build every run
            mem, _, wall = cli(work, "precompute", "--k", "0", "--dataset", data, "--cache-dir", cdir, *common)
            s = stats(cache_file(cdir))
            mbps = s["hidden_bytes"] / s["loop_seconds"] / 1e6
            dd = disk_write_mbps(work, min(s["hidden_bytes"], int(args.write_cap_gb * 1e9)))
            halves = subprocess.run([PY, "-c", HALVES, ROOT, cache_file(cdir), os.path.join(work, "w.bin"), "-"],
                                    capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            halves = json.loads(halves)
            res["precompute"][n] = {**mem, "wall_s": wall, **halves, "writer_vs_disk": halves["writer_MBps"] / dd,
                                    "loop_vs_forward": s["tokens"] / s["loop_seconds"] / halves["forward_tok_s"], "examples": s["examples"], "tokens": s["tokens"],
                                    "hidden_GB": s["hidden_bytes"] / 1e9, "prepare_s": s["prepare_seconds"],
                                    "loop_s": s["loop_seconds"], "checksum_s": s["checksum_seconds"],
                                    "loop_tok_s": s["tokens"] / s["loop_seconds"], "loop_MBps": mbps,
                                    "disk_write_MBps": dd, "loop_vs_disk": mbps / dd}
            print(f"precompute x{n}: {json.dumps(res['precompute'][n])}", flush=True)
        base = res["precompute"][sizes[0]]["peak_rss_mb"]
        for n in sizes:
            res["precompute"][n]["rss_vs_1x"] = res["precompute"][n]["peak_rss_mb"] / base
            res["precompute"][n]["anon_vs_1x"] = (res["precompute"][n]["peak_rss_anon_mb"] /
                                                  res["precompute"][sizes[0]]["peak_rss_anon_mb"])

    if "nproc" in parts:
        # --- 2 processes vs 1 for precompute, middle size, one after the other in fresh cache folders
        runs = {}
        for nproc in (1, 2):
            cdir = os.path.join(work, f"minilm-x{mid}-{nproc}proc")
            shutil.rmtree(cdir, ignore_errors=True)
            _, _, wall = cli(work, "precompute", "--k", "0", "--dataset", make_corpus(work, mid), "--cache-dir", cdir,
                             *common, nproc=nproc)
            runs[nproc] = (stats(cache_file(cdir))["loop_seconds"], wall)
            shutil.rmtree(cdir, ignore_errors=True)
        res["nproc_precompute"] = {"size": mid, "loop_s_1": runs[1][0], "loop_s_2": runs[2][0],
                                   "loop_speedup": runs[1][0] / runs[2][0], "wall_s_1": runs[1][1],
                                   "wall_s_2": runs[2][1]}
        print(f"nproc: {json.dumps(res['nproc_precompute'])}", flush=True)

    if "reader" in parts:
        # --- width 768 cache (1-layer BERT, --k 1 = head only), then the reader from the page cache
        cli(work, "precompute", "--model", wide, "--k", "1", "--dataset", wdata, "--cache-dir", wdir, *common)
        caches = {384: (cache_file(os.path.join(work, f"minilm-x{mid}")), 0), 768: (cache_file(wdir), 1)}
        for hidden, (path, depth) in caches.items():
            reader(path, depth, 256, seconds=5)  # warm the page cache
            for bs in (32, 256):
                r = reader(path, depth, bs)
                equiv = res["memcpy_GBps"] * 1e9 / (hidden * 2)
                res["reader"][f"h{hidden}_bs{bs}"] = {**r, "memcpy_tok_s": equiv, "vs_memcpy": r["tok_s_total"] / equiv}
            r2 = reader(path, depth, 256, procs=2)
            res["reader"][f"h{hidden}_bs256_2proc"] = r2
            ram = reader(path, depth, 256, in_memory=True)  # the in-RAM copy (its load time not counted)
            res["reader"][f"h{hidden}_bs256_in_memory"] = {**ram, "memcpy_tok_s": equiv, "vs_memcpy": ram["tok_s_total"] / equiv}
            print(f"reader h{hidden}: {json.dumps({k: v for k, v in res['reader'].items() if k.startswith(f'h{hidden}')})}",
                  flush=True)

    if "cold" in parts:
        # --- a cache larger than RAM (or evicted): sequential read vs the reader, training and storage order
        big = cache_file(os.path.join(work, f"minilm-x{sizes[-1]}"))
        seq = sequential_read_mbps(big)
        # a third of the train split's tokens: every byte read comes from the disk (first touch after the eviction)
        with h5py.File(big, "r") as f:
            third = int(f["train/offsets"][-1]) // 3
        cold = {"file_GB": os.path.getsize(big) / 1e9, "seq_read_MBps": seq, "tokens_read": third}
        for order, shuffle in (("training_order", True), ("storage_order", False)):
            evict(big)
            r = reader(big, 0, 256, shuffle=shuffle, seconds=300, max_tokens=third)
            mbps = r["tok_s_total"] * 384 * 2 / 1e6
            cold[order] = {**r, "MBps": mbps, "vs_seq_read": mbps / seq}
        res["cold"] = cold
        print(f"cold: {json.dumps(cold)}", flush=True)

    if "rss" in parts:
        # --- RssAnon of the data path alone at each size (a reader process, MiniLM caches, batch 256)
        res["reader_rss_anon"] = {n: reader(cache_file(os.path.join(work, f"minilm-x{n}")), 0, 256, seconds=10)
                                  for n in sizes}
        print(f"reader RssAnon: {json.dumps(res['reader_rss_anon'])}", flush=True)

    if "rss" in parts:
        # --- RssAnon of a short training at each size (MiniLM, all 6 layers from depth 0, 20 steps)
        for n in sizes:
            mem, _, _ = cli(work, "train", "--k", "0", "--dataset", make_corpus(work, n), "--cache-dir",
                            os.path.join(work, f"minilm-x{n}"), "--runs-dir", os.path.join(work, "runs"),
                            "--max-steps", "20", "--checkpoint-every", "-1", *common)
            res["rss_anon"][n] = mem
            print(f"train x{n}: {json.dumps(mem)}", flush=True)

    if "head_only" in parts:
        # --- end to end, head only at width 768, from the page cache (read once first)
        res["head_only"] = {}
        reader(cache_file(wdir), 1, 256, seconds=5)
        for bs in (256, 32):
            _, stdout, _ = cli(work, "train", "--model", wide, "--k", "1", "--dataset", wdata, "--cache-dir", wdir,
                               "--runs-dir", os.path.join(work, "runs"), "--epochs", "1", "--batch-size", bs,
                               "--checkpoint-every", "-1", *common)
            run = [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("run dir: ")][-1]
            rec = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
            res["head_only"][bs] = {"train_tok_s": rec["train_tokens_per_s"], "train_s": rec["train_seconds"],
                                    "val_accuracy": rec.get("val_accuracy")}
            print(f"head-only bs{bs}: {json.dumps(res['head_only'][bs])}", flush=True)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_scale.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    md = table(res)
    with open(os.path.join(out_dir, "bench_scale.md"), "w") as fh:
        fh.write(md)
    print(md)


def table(r: dict) -> str:
    r = {"precompute": {}, "reader": {}, "rss_anon": {}, "head_only": {}, **r}
    lines = [f"Machine: {r['machine']}; {r['date']}; `{r['command']}`; memcpy {r['memcpy_GBps']:.1f} GB/s", "",
             "| corpus | examples | tokens | peak RSS MB (vs 1x) | peak RssAnon MB (vs 1x) | prepare s | loop s | loop MB/s | disk write MB/s | "
             "loop / disk | writer alone MB/s (/ disk) | loop / forward alone | checksums s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, p in r["precompute"].items():
        lines.append(f"| x{n} | {p['examples']:,} | {p['tokens']:,} | {p['peak_rss_mb']:.0f} ({p['rss_vs_1x']:.2f}) | "
                     f"{p['peak_rss_anon_mb']:.0f} ({p['anon_vs_1x']:.2f}) | "
                     f"{p['prepare_s']:.1f} | {p['loop_s']:.1f} | {p['loop_MBps']:.0f} | {p['disk_write_MBps']:.0f} | "
                     f"**{p['loop_vs_disk']:.2f}** | {p['writer_MBps']:.0f} (**{p['writer_vs_disk']:.2f}**) | "
                     f"**{p['loop_vs_forward']:.2f}** | {p['checksum_s']:.1f} |")
    n = r.get("nproc_precompute")
    lines += ["", f"Precompute x{n['size']}, 2 processes vs 1: loop {n['loop_s_2']:.1f} s vs {n['loop_s_1']:.1f} s "
                  f"(**{n['loop_speedup']:.2f}x**), wall {n['wall_s_2']:.1f} s vs {n['wall_s_1']:.1f} s" if n else "", "",
              "| reader (no model, page cache) | tok/s | memcpy-equivalent tok/s | ratio |", "|---|---|---|---|"]
    for key, v in r["reader"].items():
        if "memcpy_tok_s" in v:
            lines.append(f"| {key} | {v['tok_s_total'] / 1e6:.2f}M | {v['memcpy_tok_s'] / 1e6:.1f}M | "
                         f"**{v['vs_memcpy']:.2f}** |")
        else:
            lines.append(f"| {key[:-len('_2proc')]} (2 processes at once) | {v['tok_s_total'] / 1e6:.2f}M total "
                         f"({', '.join(f'{t / 1e6:.2f}M' for t in v['tok_s_per_process'])}) | | |")
    c = r.get("cold", {"file_GB": 0, "seq_read_MBps": 0, "tokens_read": 0})
    lines += ["", f"Cold cache ({c['file_GB']:.1f} GB file evicted from the page cache): sequential read "
                  f"{c['seq_read_MBps']:.0f} MB/s"]
    lines.append(f"(the reader read {c['tokens_read'] / 1e6:.1f}M tokens = a third of the train split, each byte "
                 f"once from the disk)")
    for order in [o for o in ("training_order", "storage_order") if o in c]:
        v = c[order]
        lines.append(f"- reader, {order.replace('_', ' ')}: {v['tok_s_total'] / 1e6:.2f}M tok/s = {v['MBps']:.0f} MB/s, "
                     f"**{v['vs_seq_read']:.2f}x** of the sequential read")
    lines += ["", "| corpus | reader RssAnon MB (batch 256, no model) | reader tok/s | training (20 steps + eval) "
                  "peak RssAnon MB | peak RSS MB |", "|---|---|---|---|---|"]
    for n, m in r["rss_anon"].items():
        d = r["reader_rss_anon"][n if n in r["reader_rss_anon"] else str(n)]
        lines.append(f"| x{n} | {d['rss_anon_mb']:.0f} | {d['tok_s_total'] / 1e6:.2f}M | {m['peak_rss_anon_mb']:.0f} | "
                     f"{m['peak_rss_mb']:.0f} |")
    lines += ["", "| head-only training, width 768 | tok/s | epoch s |", "|---|---|---|"]
    for bs, h in r["head_only"].items():
        lines.append(f"| batch {bs} | **{h['train_tok_s'] / 1e6:.2f}M** | {h['train_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
