"""SIGTERM or Ctrl-C during training: the run saves a checkpoint at the current step and exits with
status 0; a restart resumes from that step."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_sigterm_saves_and_exits_cleanly(tmp_path, signum):
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
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (130 if signum == signal.SIGINT else 0), out  # Ctrl-C: saved, but not finished
    assert f"signal {int(signum)}: saving step" in out, out
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


def test_sigterm_while_the_last_checkpoint_is_written_waits_for_it(tmp_path):
    """The final save is asynchronous: a SIGTERM that arrives while it is written (the end of a run
    meeting a scheduler's warning signal) waits for it instead of killing the run without a checkpoint."""
    wrapper = ("import os, signal, sys, time\n"
               "from radsam_jax.train import checkpointing, cli\n"
               "finish = checkpointing.Checkpointer.wait_until_finished\n"
               "def signalled(self):\n"
               "    os.kill(os.getpid(), signal.SIGTERM)\n"
               "    time.sleep(0.2)  # delivered before the wait\n"
               "    return finish(self)\n"
               "checkpointing.Checkpointer.wait_until_finished = signalled\n"
               "sys.exit(cli.main(sys.argv[1:]))\n")
    command = [sys.executable, "-c", wrapper, *_command(tmp_path, 2)[3:]]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"], done.stdout
    again = subprocess.run(_command(tmp_path, 2), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
    assert "already finished at step 2" in again.stdout, again.stdout + again.stderr


def test_a_ctrl_c_relayed_twice_is_one_stop_and_a_later_one_stops_at_once():
    from radsam_jax.train.checkpointing import PreemptionGuard

    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)  # from the terminal
        os.kill(os.getpid(), signal.SIGINT)  # and relayed by a wrapper such as `timeout`
        time.sleep(0.1)
        assert guard.should_stop and guard.received == signal.SIGINT
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the user's second Ctrl-C: no more waiting
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before  # the guard puts back what it found
