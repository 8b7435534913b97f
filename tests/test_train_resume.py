"""Kill-and-resume equals an uninterrupted run: same next batch (the Grain iterator state is in the
checkpoint), same losses after the resume, same final parameters. A fake incomplete Orbax temporary
directory left by a "killed mid-save" run must be ignored (and cleaned up) on restart."""

import json

from train_testlib import check, run_python

WORKER = r"""
import json, os, pathlib, sys, jax, numpy as np
from train_testlib import tiny_config
from radsam_jax.train import checkpointing, loop
from radsam_jax.train.synthetic import make_synthetic_iterator
root = pathlib.Path(sys.argv[1])

def losses(workdir):
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

def final_params(workdir, step):
    ck = checkpointing.Checkpointer(workdir / "checkpoints", async_save=False)
    params = ck.restore_state_arrays(step)["params"]
    ck.close()
    return params

# Uninterrupted: 6 steps.
a = root / "a"
loop.train_and_evaluate(tiny_config(num_train_steps=6), str(a))
# Interrupted: 3 steps (checkpointed at 3), then a fake half-written step-5 checkpoint, then resume to 6.
b = root / "b"
loop.train_and_evaluate(tiny_config(num_train_steps=3), str(b))
tmp = b / "checkpoints" / "5.orbax-checkpoint-tmp-1234567"
(tmp / "state").mkdir(parents=True)
(tmp / "state" / "garbage").write_text("half written")
ck = checkpointing.Checkpointer(b / "checkpoints", async_save=False)
latest = ck.latest_step()
# The next batch after the step-3 checkpoint is the 4th batch of a fresh iterator.
mc, _ = loop.load_model(tiny_config())
c = tiny_config()
fresh = make_synthetic_iterator(mc, split="train", batch_size=4, seed=0, num_examples=c.synthetic.num_train)
for _ in range(3):
    next(fresh)
expected = next(fresh)
it = make_synthetic_iterator(mc, split="train", batch_size=4, seed=0, num_examples=c.synthetic.num_train)
restored = ck.manager.restore(3, args=__import__("orbax.checkpoint", fromlist=["args"]).args.Composite(
    data_iter=__import__("grain").checkpoint.CheckpointRestore(it)))
ck.close()
got = next(it)
same_batch = all(np.array_equal(expected[k], got[k]) for k in expected)
loop.train_and_evaluate(tiny_config(num_train_steps=6), str(b))
la, lb = losses(a), losses(b)
pa, pb = final_params(a, 6), final_params(b, 6)
diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
print(json.dumps({"latest_before_resume": latest, "same_batch": same_batch, "losses_a": la, "losses_b": lb,
                  "param_max_abs_diff": diff, "tmp_left": tmp.exists(),
                  "steps_b": sorted(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit())}))
"""


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    out = check(run_python(WORKER.replace("sys.argv[1]", repr(str(tmp_path)))))
    r = json.loads(out.strip().splitlines()[-1])
    assert r["latest_before_resume"] == 3, r  # the incomplete step-5 directory is not a checkpoint
    assert r["same_batch"], r
    la, lb = r["losses_a"], r["losses_b"]
    assert sorted(map(int, la)) == sorted(map(int, lb)) == list(range(1, 7)), (la, lb)
    for s in la:
        assert abs(la[s] - lb[s]) <= 1e-6 * abs(la[s]), (s, la[s], lb[s])
    assert r["param_max_abs_diff"] == 0.0, r
    assert not r["tmp_left"], r  # cleaned up at start-up
    assert r["steps_b"][-1] == 6
