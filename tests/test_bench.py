"""The benchmark runs end to end (a tiny run: it checks the benchmark works, never a speed threshold)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--shape", "minilm", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "bench.json"))["results"][0]
    for method in ("baseline_trainer", "baseline_loop", "ours_train", "limit", "peer_lora", "peer_setfit_head"):
        assert result[method]["epoch_s"] > 0 and result[method]["peak_rss_mb"] > 0
    assert result["ours_precompute"]["examples"] == 60 and result["ours_precompute"]["cache_bytes"] > 0
    assert set(result["ratios"]) >= {"epoch_speedup_vs_A", "epoch_speedup_vs_B", "ours_vs_limit",
                                     "break_even_epochs_vs_B", "sweep8_cost_ratio_B_over_ours"}
    table = (tmp_path / "bench.md").read_text()
    assert "| ours: precompute + train from cache |" in table and "epoch_speedup_vs_A" in table
    assert "| peer: LoRA r=8" in table and "| peer: SetFit-style head" in table and "epoch_speedup_vs_lora" in table
    assert 0 < result["peer_lora"]["trainable_params"] < result["baseline_loop"]["trainable_params"]
