"""Shared helpers of tests/test_train_*.py: a tiny model config and a subprocess runner whose
children share a persistent XLA compilation cache (compiles dominate these tests on 2 CPU cores)."""

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("RADSAM_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "radsam_jax_test_cache"))
# Cheaper XLA CPU compiles for tests (numerics are unchanged up to float rounding).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

TINY_MODEL = dict(name="small", image_size=64, encoder_dim=32, encoder_depth=2, encoder_heads=2, window_size=2,
                  global_attn_indexes=(1,), prompt_embed_dim=32, decoder_heads=2, decoder_mlp_dim=64,
                  iou_head_hidden_dim=32)


def tiny_config(**overrides):
    """A base training config with the tiny model on synthetic data, small and fast."""
    from radsam_jax.train.config_lib import base_config

    c = base_config()
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
