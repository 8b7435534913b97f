"""Multi-host training on this machine: 2 processes x 4 CPU devices (launch/local_multiprocess.py,
coordinator on 127.0.0.1, Gloo collectives) train the tiny model through `radsam train`'s entry, with
gradient accumulation, and end with the parameters of 1 process x 8 devices fed the same global
batches; then the 2-process run resumes from its Orbax checkpoint (written by both processes into one
shared directory) for one more step, still equal to the single process. Also: only process 0 logs
and writes metrics.

Every process this test starts is stopped by it (train_testlib.launch_processes)."""

import json
import os
import shutil
import sys
import time

from train_testlib import check, launch_processes, run_python

TESTS = os.path.dirname(os.path.abspath(__file__))

# The config every run uses (a file, as `radsam train --config` wants). Global batch 16 = 2 rows per
# device in both topologies, run as 2 microbatches (gradient accumulation over a mesh that spans
# the processes; accumulation against none: test_train_sharding.py). Adam with eps=1 is ~ lr *
# gradient for these small gradients: with the default eps the first Adam step is ~ lr * sign(g),
# and gradients that are zero up to float rounding (attention key biases) would flip sign between
# the two reduction orders, which is not what this test checks (see test_train_sharding.py).
CONFIG = r"""
import sys
sys.path.insert(0, TESTS)
from train_testlib import tiny_config

def get_config():
    c = tiny_config(batch_size=16)
    c.grad_accum_steps = 2
    c.optim.learning_rate = 0.1
    c.optim.eps = 1.0
    c.eval.max_batches = 1
    c.checkpoint.max_to_keep = 5
    return c
"""

# No mask prompts: at initialisation the mask-prompt downscaler feeds all-zero patches into a
# LayerNorm (variance 0) whose huge gradients make float32 summation order alone differ by ~1.5e-5
# (test_train_sharding.py). Patched the same way in the training processes and the reference.
NO_MASK_PROMPTS = r"""
import numpy as np
import radsam_jax.train.synthetic as _synthetic
_example = _synthetic.synthetic_example
def _no_mask(*args, **kwargs):
    ex = _example(*args, **kwargs)
    ex["has_mask"] = np.asarray(False)
    return ex
_synthetic.synthetic_example = _no_mask
"""

# One training process: `radsam train`'s entry; the topology comes from the launcher's RADSAM_* env.
TRAIN = NO_MASK_PROMPTS + r"""
import sys
from radsam_jax.train import cli
sys.exit(cli.main(sys.argv[1:]))
"""

# The reference: one process, 8 devices, global batch = process 0's local batch then process 1's.
REFERENCE = NO_MASK_PROMPTS + r"""
import json, sys, jax
from radsam_jax.train import checkpointing, loop, optimizer as optimizer_lib, train_step as ts
from radsam_jax.train.config_lib import load_config_file
from radsam_jax.train.synthetic import make_synthetic_iterator
config_path, workdir, steps = ARGS
assert jax.device_count() == 8 and jax.process_count() == 1
c = load_config_file(config_path)
jax.config.update("jax_compilation_cache_dir", c.compilation_cache_dir)
mc, _ = loop.load_model(c)
abstract = jax.eval_shape(lambda: ts.init_variables(mc, jax.random.PRNGKey(0))["params"])
tx = optimizer_lib.make_optimizer(c.optim, abstract, 1)
shards = [make_synthetic_iterator(mc, split="train", batch_size=8, seed=c.seed, num_examples=c.synthetic.num_train,
                                  shard_index=i, shard_count=2) for i in range(2)]
mesh = ts.make_mesh(8)
ckpt = checkpointing.Checkpointer(workdir + "/checkpoints", async_save=False)
leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
norm = lambda xs: float(np.sqrt(sum(np.sum(x ** 2) for x in xs)))
out = {"checkpoints": ckpt.all_steps()}
with jax.set_mesh(mesh):
    state = ts.create_sharded_state(mc, c, tx, mesh)
    p0 = leaves(jax.device_get(state.params))
    train_step = ts.make_train_step(mc, c, tx, mesh)
    for step in range(1, max(steps) + 1):
        local = [next(s) for s in shards]
        batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
        state, _ = train_step(state, ts.to_global_batch(batch, mesh))
        if step in steps:
            ref = leaves(jax.device_get(state.params))
            got = leaves(ckpt.restore_state_arrays(step)["params"])
            out[step] = {
                "params_rel": norm([a - b for a, b in zip(ref, got)]) / norm(ref),
                "update_rel": norm([a - b for a, b in zip(ref, got)]) / norm([a - z for a, z in zip(ref, p0)]),
            }
ckpt.close()
print(json.dumps(out))
"""


def launch(config_path, workdir, num_train_steps: int, log_path, timeout: float = 480) -> str:
    """2 processes x 4 CPU devices running TRAIN; the launcher's output (also in `log_path`)."""
    return launch_processes([sys.executable, "-c", TRAIN, "--config", str(config_path), "--workdir", str(workdir),
                             f"--config.num_train_steps={num_train_steps}"], processes=2, devices=4,
                            log_path=log_path, timeout=timeout)


def test_two_processes_equal_one_process_and_resume(tmp_path):
    t0 = time.perf_counter()
    config_path = tmp_path / "tiny_multihost.py"
    config_path.write_text(CONFIG.replace("TESTS", repr(TESTS)))
    workdir = tmp_path / "run"

    out1 = launch(config_path, workdir, num_train_steps=2, log_path=tmp_path / "launch_1.log")
    t1 = time.perf_counter()
    assert "[p0] mesh {'data': 8} over 8 cpu devices, 2 process(es)" in out1, out1[-4000:]
    assert "[p1] step" not in out1 and "[p1] mesh" not in out1, out1[-4000:]  # only process 0 logs
    out2 = launch(config_path, workdir, num_train_steps=3, log_path=tmp_path / "launch_2.log")  # resumes at 2
    t2 = time.perf_counter()
    assert "[p0] resumed from" in out2 and "(step 2)" in out2, out2[-4000:]

    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3], rows  # once each: process 0 only
    assert (workdir / "tensorboard").is_dir()
    data_iter = sorted(f for f in os.listdir(workdir / "checkpoints" / "3" / "data_iter") if f.startswith("process_"))
    assert data_iter == ["process_0-of-2.json", "process_1-of-2.json"], data_iter
    # Each process saved its own share of the data order: one process cannot take both up (exit 2, before any step).
    alone = shutil.copytree(workdir, tmp_path / "alone")
    argv = ["radsam train", "--config", str(config_path), "--workdir", str(alone), "--config.num_train_steps=4"]
    refused = run_python(f"import sys\nsys.argv = {argv!r}\n" + TRAIN, devices=8, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (f"radsam train: error: checkpoint {alone / 'checkpoints' / '3'} was written by 2 process(es): each saved "
            f"its own share of the data order; resume with 2 process(es), not 1") in refused.stderr

    code = REFERENCE.replace("ARGS", repr((str(config_path), str(workdir), (2, 3))))
    ref = json.loads(check(run_python(code, devices=8, timeout=480)).strip().splitlines()[-1])
    t3 = time.perf_counter()
    print(json.dumps({"reference": ref, "wall_s": {"two_process_2_steps": t1 - t0, "resume_1_step": t2 - t1,
                                                   "reference": t3 - t2, "total": t3 - t0}}))
    assert ref["checkpoints"][-2:] == [2, 3], ref
    for step in ("2", "3"):
        assert ref[step]["params_rel"] <= 1e-5, ref
        assert ref[step]["update_rel"] <= 1e-5, ref
