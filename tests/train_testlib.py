"""Shared helpers of tests/test_train_*.py: a tiny model config and a subprocess runner whose
children share a persistent XLA compilation cache (compiles dominate these tests on 2 CPU cores)."""

import os
import signal
import subprocess
import sys
import tempfile

import pytest
from tiny_model import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("RADSAM_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "radsam_jax_test_cache"))
# Cheaper XLA CPU compiles for tests (numerics are unchanged up to float rounding).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"



def tiny_config(**overrides):
    """A base training config with the tiny model on synthetic data, small and fast."""
    from radsam_jax.train.config_lib import base_config

    c = base_config()
    c.model.name = "small"
    for k, v in TINY_MODEL.items():
        c.model[k] = v
    c.data_source = "synthetic"
    c.synthetic.num_train = 32
    c.synthetic.num_validation = 8
    c.batch_size = 4
    c.num_epochs = -1
    c.optim.learning_rate = 1e-3
    c.log_every_steps = 1
    c.eval.every_steps = -1
    c.eval.batch_size = 8
    c.checkpoint.async_save = True
    c.compilation_cache_dir = CACHE
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def purge_steps(workdir) -> list[int]:
    """Steps of the SessionLog START events (TensorBoard's purge_step) in a workdir's event files."""
    import struct

    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted((workdir / "tensorboard").glob("events.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: u64 length, u32 crc, data, u32 crc
            n = struct.unpack("<Q", data[at: at + 8])[0]
            event = event_pb2.Event.FromString(data[at + 12: at + 12 + n])
            at += 16 + n
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps.append(event.step)
    return steps


def run_python(code: str, *, devices: int = 1, timeout: int = 600, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{FAST_XLA} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.path.join(REPO, "tests") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT\n{result.stdout[-4000:]}\nSTDERR\n{result.stderr[-4000:]}"
    return result.stdout


def launch_processes(command: list, *, processes: int, devices: int, log_path, timeout: float = 480) -> str:
    """`command` in `processes` cooperating JAX processes of `devices` CPU devices each
    (launch/local_multiprocess.py: coordinator on 127.0.0.1, Gloo collectives); the launcher's output
    (every line prefixed "[pI]"), also written to `log_path`. Fails the test, showing the first error,
    if any process fails. Always stops what it started: the launcher runs in its own process group,
    gets SIGTERM (which it forwards to its children) and then SIGKILL, and its children die with it."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_XLA
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.path.join(REPO, "tests") + os.pathsep + env.get("PYTHONPATH", "")
    env["RADSAM_TEST_JAX_CACHE"] = CACHE
    cmd = [sys.executable, os.path.join(REPO, "launch", "local_multiprocess.py"), "-n", str(processes),
           "-k", str(devices), "--timeout", str(timeout), "--grace", "10", "--", *command]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout + 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher forwards it to its processes
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own group; its children die with it
        except ProcessLookupError:
            pass
        proc.wait()
    out = out or ""
    log_path.write_text(out)
    if proc.returncode != 0:
        # The first error is what matters; the end is usually the other process being stopped.
        lines = [l for l in out.splitlines() if "WARNING" not in l and "[Gloo]" not in l]
        first = next((i for i, l in enumerate(lines) if "Error" in l or "Traceback" in l), max(len(lines) - 40, 0))
        pytest.fail(f"launcher exit {proc.returncode} (full output: {log_path})\n"
                    + "\n".join(lines[max(first - 20, 0): first + 40]) + "\n...\n" + "\n".join(lines[-15:]))
    return out
