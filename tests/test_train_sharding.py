"""One train step on 8 CPU devices (batch split over a "data" mesh axis) equals the same step on one
device: same loss (relative 1e-5) and same parameters after the update (relative 1e-5 in L2 over all
parameters, over the update itself, and per array). So does the step with gradient accumulation
(the batch run as 4 microbatches) on 1 and on 2 devices, whose compiled program all-reduces the
gradients once, after the microbatch loop; and, for the parameters it trains, the step with a frozen
image encoder (on 1 device, and on 2 with 4 microbatches), which leaves the encoder as it was and
skips its backward pass. Plain SGD isolates the gradient reduction. Runs in a subprocess because
the device count must be set (XLA_FLAGS) before jax is imported."""

import json

from train_testlib import check, run_python

WORKER = r"""
import json, re, jax, numpy as np
import jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", __import__("train_testlib").CACHE)
from train_testlib import tiny_config
from radsam_jax.train import loop, optimizer as opt, train_step as ts
from radsam_jax.train.synthetic import make_synthetic_iterator
assert jax.device_count() == 8, jax.devices()
c = tiny_config(batch_size=8)
mc, _ = loop.load_model(c)
params = jax.eval_shape(lambda: ts.init_variables(mc, jax.random.PRNGKey(0))["params"])
# Plain SGD: the parameters then differ exactly by lr x (gradient difference). With Adam the first
# step is ~lr * sign(g), so gradients that are zero up to float rounding (e.g. of zero-initialised
# biases) could flip sign between reduction orders and hide what this test checks: the sharded
# gradient all-reduce. (The Adam path is the same jitted step and is covered by the resume test.)
import optax
tx = optax.sgd(0.1)
batch = next(make_synthetic_iterator(mc, split="train", batch_size=8, seed=0))
# No mask prompts here: at initialisation (zero conv biases) the mask-prompt downscaler feeds all-zero
# 4-channel patches into a LayerNorm (variance 0, eps 1e-6), whose gradients of ~1e4 make float32
# summation order alone differ by ~1.5e-5. That is conditioning, not sharding; the mask path is
# trained in the resume and example tests.
batch["has_mask"][:] = False
SETUPS = [(1, 1), (8, 1), (1, 4), (2, 4)]  # (devices, microbatches); the first is the reference
out, all_reduces = {}, {}
for n, accum in SETUPS:
    mesh = ts.make_mesh(n)
    with jax.set_mesh(mesh):
        state = ts.create_sharded_state(mc, c, tx, mesh)
        p0 = jax.device_get(state.params)
        c.grad_accum_steps = accum
        step = ts.make_train_step(mc, c, tx, mesh)
        gb = ts.to_global_batch(batch, mesh)
        assert len(gb["image"].sharding.device_set) == n
        step = step.lower(state, gb).compile()
        if n > 1:  # gradients all-reduced once per step, not once per microbatch inside the loop
            hlo = step.as_text()
            computations = {re.match(r"(?:ENTRY )?%?([\w.-]+)", block.strip()).group(1): block
                            for block in hlo.split("\n\n") if block.strip()}
            loop_bodies = set(re.findall(r"body=%?([\w.-]+)", hlo))
            all_reduces[f"{n}x{accum}"] = (hlo.count(" all-reduce("),
                                           sum(computations[b].count(" all-reduce(") for b in loop_bodies))
        state, m = step(state, gb)
        assert len(state.params["mask_decoder"]["iou_token"].sharding.device_set) == n
        out[(n, accum)] = ({k: float(v) for k, v in m.items()}, jax.device_get(state.params))

def compare(m1, p1, m2, p2):
    # Global: the whole update (parameters after - before) agrees to 1e-5 in relative L2 norm.
    z0 = [z for k, z in jax.tree_util.tree_leaves_with_path(p0) if k[0].key in p1]  # p1's part of p0
    d1 = [a - z for a, z in zip(jax.tree.leaves(p1), z0)]
    d2 = [b - z for b, z in zip(jax.tree.leaves(p2), z0)]
    update_rel = float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(d1, d2))) / np.sqrt(sum(np.sum(x ** 2) for x in d1)))
    params_rel = float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2))))
                       / np.sqrt(sum(np.sum(a ** 2) for a in jax.tree.leaves(p1))))
    # Per parameter array, max|a - b| <= 1e-5 max|a| + 1e-7. The absolute floor is for the attention key
    # biases, whose gradient is exactly zero in exact arithmetic (softmax ignores a shift
    # shared by all keys), so they hold float noise of ~1e-10 that no relative tolerance can compare.
    worst = max(float(np.max(np.abs(a - b)) / (1e-5 * np.max(np.abs(a)) + 1e-7))
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    metrics_rel = {k: abs(m1[k] - m2[k]) / max(abs(m1[k]), 1e-30) for k in m1}
    return {"update_rel": update_rel, "params_rel": params_rel, "worst_array": worst, "metrics_rel": metrics_rel}

m1, p1 = out[(1, 1)]
results = {f"{n}x{accum}": compare(m1, p1, *out[(n, accum)]) for n, accum in SETUPS[1:]}
results["all_reduces"] = all_reduces  # (in the step, in its loop bodies) per sharded setup

# A frozen image encoder: its parameters stay, the others get the same update as when everything
# trains (their gradients do not depend on it), and the step has no backward pass through it.
mesh = ts.make_mesh(1)
flops = {}
with jax.set_mesh(mesh):
    gb = ts.to_global_batch(batch, mesh)
    for frozen in ((), ("image_encoder/.*",)):
        c.grad_accum_steps, c.optim.frozen = 1, frozen
        state = ts.create_sharded_state(mc, c, tx, mesh)
        step = ts.make_train_step(mc, c, tx, mesh)
        flops[frozen] = step.lower(state, gb).compile().cost_analysis()["flops"]
    state, m = step(state, gb)
    variables = {"params": state.params, "buffers": state.buffers}
    encode = lambda v, x: ts.Sam(mc).apply(v, x, method=ts.Sam.encode)
    encoder_forward = jax.jit(encode).lower(variables, gb["image"]).compile().cost_analysis()["flops"]
pf = jax.device_get(state.params)
# The same with 4 microbatches on 2 devices (the frozen split's None leaves through the shard_map).
mesh = ts.make_mesh(2)
with jax.set_mesh(mesh):
    c.grad_accum_steps = 4
    state = ts.create_sharded_state(mc, c, tx, mesh)
    state, m_accum = ts.make_train_step(mc, c, tx, mesh)(state, ts.to_global_batch(batch, mesh))
pf_accum = jax.device_get(state.params)
moved = lambda params: max(float(np.max(np.abs(a - b)))
                           for a, b in zip(jax.tree.leaves(params["image_encoder"]), jax.tree.leaves(p0["image_encoder"])))
rest = lambda tree: {k: v for k, v in tree.items() if k != "image_encoder"}
saved = flops[()] - flops[("image_encoder/.*",)]
results["frozen_encoder"] = {"encoder_moved": moved(pf), "saved_per_encoder_forward": saved / encoder_forward,
                             **compare({"loss": m1["loss"]}, rest(p1), {"loss": float(m["loss"])}, rest(pf))}
results["frozen_encoder_2x4"] = {"encoder_moved": moved(pf_accum),
                                 **compare({"loss": m1["loss"]}, rest(p1), {"loss": float(m_accum["loss"])}, rest(pf_accum))}
print(json.dumps(results))
"""


def test_sharded_and_accumulated_steps_equal_one_device_step():
    out = check(run_python(WORKER, devices=8))
    results = json.loads(out.strip().splitlines()[-1])
    print(results)
    assert set(results) == {"8x1", "1x4", "2x4", "frozen_encoder", "frozen_encoder_2x4", "all_reduces"}, results
    all_reduces = results.pop("all_reduces")
    assert all_reduces["8x1"][0] >= 1 and all_reduces["2x4"][0] >= 1, all_reduces  # the gradients are reduced
    assert all_reduces["2x4"][1] == 0, all_reduces  # ... after the microbatch loop, not in it,
    assert all_reduces["2x4"][0] <= all_reduces["8x1"][0], all_reduces  # nor once per unrolled microbatch
    frozen = results["frozen_encoder"]
    assert frozen["encoder_moved"] == results["frozen_encoder_2x4"]["encoder_moved"] == 0.0, results
    # No backward pass through the encoder: the step is cheaper by more than one encoder forward pass
    # (measured 1.5 here: gradients of its activations and weights, less the image's, which no
    # step computes). Differentiating every parameter and zeroing the frozen ones' updates saves ~0.
    assert frozen["saved_per_encoder_forward"] > 1.0, frozen
    for setup, r in results.items():
        # loss terms, dice and grad_norm are means over the batch: equal up to summation order
        assert max(r["metrics_rel"].values()) <= 1e-5, (setup, r)
        assert r["params_rel"] <= 1e-5, (setup, r)
        assert r["update_rel"] <= 1e-5, (setup, r)
        assert r["worst_array"] <= 1.0, (setup, r)  # in units of the per-array tolerance 1e-5 max|a| + 1e-7
