"""SIGTERM during training: the run saves a checkpoint at the current step and exits with status 0;
a restart resumes from that step."""

import json
import os
import signal
import subprocess
import sys
import time

from train_testlib import CACHE, FAST_XLA, REPO, TINY_MODEL


def _command(workdir, steps):
    args = [sys.executable, "-m", "radsam_jax.train.cli", "--config", "configs/train/example_cpu.py:runlocal",
            "--workdir", str(workdir), "--config.data_source=synthetic", "--config.synthetic.num_train=32",
            "--config.synthetic.num_validation=8", "--config.batch_size=4", "--config.eval.batch_size=8",
            "--config.eval.at_start=false", "--config.log_every_steps=1", f"--config.num_train_steps={steps}",
            f"--config.compilation_cache_dir={CACHE}"]
    for k, v in TINY_MODEL.items():
        args.append(f"--config.model.{k}={v}")
    return args


def _env():
    return dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.Popen(_command(tmp_path, 100000), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 480
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and sum(1 for _ in open(metrics)) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "saving step" in out, out
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, out
    last_logged = max(json.loads(l)["step"] for l in open(metrics))
    assert steps[-1] >= last_logged >= 2, (steps, last_logged)
    assert not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    # A restart resumes from the saved step and finishes one more step.
    done = subprocess.run(_command(tmp_path, steps[-1] + 1), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=480)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"(step {steps[-1]})" in done.stdout, done.stdout
