"""Security basics: safetensors for weights, no unpickling of code, no remote code unless asked."""
import json
import os
import pickle
import re
import signal
import time

import pytest

from pipeline import make_config
from pipeline.precompute import precompute

from conftest import ROOT, cli_args, run_cli

MARKER_CODE = "open({path!r}, 'w').write('pwned')"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(path=self.marker),))


@pytest.mark.fast
def test_package_never_unpickles_or_evals():
    """Static guard over the package: every torch.load (none today) must pass weights_only=True; no pickle/eval."""
    for name in sorted(os.listdir(os.path.join(ROOT, "pipeline"))):
        if not name.endswith(".py"):
            continue
        src = open(os.path.join(ROOT, "pipeline", name)).read()
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (name, call)
        assert not re.search(r"\bpickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(|trust_remote_code=True", src), name


def test_remote_code_is_not_run_unless_asked(tmp_path, tiny_model, small_csv):
    model = tmp_path / "custom-model"
    model.mkdir()
    marker = tmp_path / "ran"
    cfg = json.load(open(os.path.join(tiny_model(), "config.json")))
    cfg.update(model_type="evil-bert", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    json.dump(cfg, open(model / "config.json", "w"))
    (model / "configuration_evil.py").write_text(
        MARKER_CODE.format(path=str(marker)) + "\nfrom transformers import BertConfig\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil-bert'\n")
    proc = run_cli("precompute", *cli_args(dict(model=model, dataset=small_csv, cache_dir=tmp_path / "cache", k=1)),
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--trust-remote-code" in proc.stderr and "off by default" in proc.stderr
    assert not marker.exists()


def test_checkpoints_hold_safetensors_and_pickled_code_is_refused(tmp_path, tiny_model, corpus_csv, cli):
    base = dict(model=tiny_model(), dataset=corpus_csv(600), cache_dir=str(tmp_path / "cache"),
                runs_dir=str(tmp_path / "runs"), k=1, max_length=64, batch_size=8, epochs=3, checkpoint_every=0)
    precompute(make_config(**base))
    opts = cli_args(base)
    from test_reliability import _checkpoints, _popen_cli

    run = tmp_path / "runs" / "r"
    proc = _popen_cli("train", *opts, "--run-name", "r")
    t0 = time.time()
    while not _checkpoints(run) and time.time() - t0 < 120:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = _checkpoints(run)[-1].parent
    files = sorted(p.name for p in ckpt.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.startswith("pytorch_model")], files
    # a tampered checkpoint: the optimizer state is a pickle that would run code when unpickled
    marker = tmp_path / "ran"
    with open(ckpt / "optimizer.bin", "wb") as fh:
        pickle.dump({"state": _Evil(str(marker))}, fh)
    out = cli("train", *opts, "--run-name", "r", "--resume", check=False)
    assert out.returncode == 2 and "cannot load checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()
