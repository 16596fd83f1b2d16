"""`make gpu-check` cannot rot: its --device cpu --quick mode runs every step of the GPU check here (precompute,
verify of fp32/fp16/bf16 caches, check --recompute, bf16 vs fp32 training, the speed and memory rows) on the real
packaged MiniLM and real data; without a GPU the plain command says so and exits 0."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu-check"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--shapes", "minilm",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    names = [c["name"] for c in result["checks"]]
    assert names == ["minilm: verify float32 cache", "minilm: verify float16 cache", "minilm: verify bfloat16 cache",
                     "minilm: check --recompute 64 (fp16 cache)", "minilm: bf16 autocast vs fp32 training"]
    assert all(c["ok"] for c in result["checks"])
    (row,) = result["rows"]
    assert row["verify_float32"] < row["verify_float16"] <= row["verify_bfloat16"]  # coarser dtypes, larger diffs
    for key in ("train_vs_limit", "precompute_vs_forward"):
        assert 0 < row[key] < 10, (key, row[key])
    assert "memory_vs_hf_trainer" not in row  # CUDA memory only: no figure on a CPU
    assert "| minilm (k=4) |" in (out / "gpu_check.md").read_text()
    assert "4 of 5 checks passed" not in proc.stdout and "5 of 5 checks passed" in proc.stdout


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the plain command runs the check there")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and "no CUDA GPU on this machine" in proc.stdout
