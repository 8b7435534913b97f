"""Training throughput: images/s of the `small` config on this machine's CPU, the compiled
ViT-B (1024 px, batch 2) train step's FLOPs from XLA's cost analysis, and its memory plan with
gradient accumulation and rematerialisation (lowered with abstract ShapeDtypeStructs, never run).

    python -m benchmarks.train_throughput [--steps 10] [--batch 4] [--memory_batch 8] [--cpu_scheduler memory] [--out FILE]

The small config runs `--steps` timed steps after one warm-up (compile) step on synthetic batches;
ViT-B is only lowered and compiled. Prints a Markdown table and writes it to --out.
"""

import argparse
import functools
import os
import pathlib
import platform
import time

import jax
import numpy as np

from benchmarks.common import blocking, lowered_flops, markdown_table, time_call
from radsam_jax.model import load_model_config, init_variables
from radsam_jax.train import optimizer as optimizer_lib
from radsam_jax.train.config_lib import base_config
from radsam_jax.train.synthetic import make_synthetic_iterator
from radsam_jax.train.train_step import BATCH_DTYPES, abstract_train_state, create_sharded_state, make_mesh, make_train_step, to_global_batch


def training_setup(name: str, precision: str, batch: int, *, remat: bool = False, accum: int = 1,
                   attention: str = "chunked", frozen: tuple = (), devices: int | None = None):
    """(training config, model config, optimiser, mesh over `devices`, default all) of preset `name`;
    `frozen`: optim.frozen regexes."""
    config = base_config()
    config.model.name = name
    config.precision = precision
    config.batch_size = batch
    config.remat = remat
    config.grad_accum_steps = accum
    config.attention = attention
    config.optim.frozen = frozen
    mc = load_model_config(name)
    params = jax.eval_shape(lambda: init_variables(mc, jax.random.PRNGKey(0))["params"])
    return config, mc, optimizer_lib.make_optimizer(config.optim, params, 1), make_mesh(devices)


@functools.cache
def synthetic_host_batches(name: str, batch: int) -> tuple[dict, dict]:
    """2 synthetic batches of model preset `name`, made once per process (~0.14 s per 1024 px example)."""
    it = make_synthetic_iterator(load_model_config(name), split="train", batch_size=batch, seed=0, num_examples=4 * batch)
    return next(it), next(it)


def synthetic_training_setup(name: str, precision: str, batch: int, remat: bool = False, accum: int = 1,
                             attention: str = "chunked"):
    """(state, jitted train step, 2 global synthetic batches, mesh) for model preset `name`."""
    config, mc, tx, mesh = training_setup(name, precision, batch, remat=remat, accum=accum, attention=attention)
    state = create_sharded_state(mc, config, tx, mesh)
    step = make_train_step(mc, config, tx, mesh)
    batches = [to_global_batch(b, mesh) for b in synthetic_host_batches(name, batch)]
    return state, step, batches, mesh


def images_per_s(steps: int, batch: int, precision: str, name: str = "small") -> dict:
    state, step, batches, mesh = synthetic_training_setup(name, precision, batch)
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        state, m = step(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(steps):
            state, m = step(state, batches[i % 2])
        jax.block_until_ready(m)
    dt = time.perf_counter() - t
    return {"images_per_s": steps * batch / dt, "step_s": dt / steps, "compile_s": compile_s}


def lower_abstract_train_step(name: str, batch: int, precision: str, accum: int = 1, remat: bool = False,
                              frozen: tuple = (), attention: str = "chunked"):
    """The train step of preset `name` on one device lowered with abstract ShapeDtypeStructs: nothing
    is allocated or run. `frozen`: optim.frozen regexes; `attention`: the encoder's implementation."""
    config, mc, tx, mesh = training_setup(name, precision, batch, remat=remat, accum=accum, attention=attention,
                                          frozen=frozen, devices=1)
    state = abstract_train_state(mc, config, tx, mesh)
    s, m, p = mc.image_size, mc.mask_size, 1
    shapes = {"image": (batch, s, s, 3), "target": (batch, s, s), "points": (batch, p, 2), "point_labels": (batch, p),
              "box": (batch, 4), "has_box": (batch,), "mask": (batch, m, m), "has_mask": (batch,)}
    bs = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch_abs = {k: jax.ShapeDtypeStruct(shapes[k], np.dtype(BATCH_DTYPES[k]), sharding=bs) for k in shapes}
    step = make_train_step(mc, config, tx, mesh)
    with jax.set_mesh(mesh):
        return step.lower(state, batch_abs)


def compile_abstract_train_step(name: str, batch: int, precision: str, accum: int = 1, remat: bool = False,
                                frozen: tuple = ()):
    """(compiled `lower_abstract_train_step`, compile seconds)."""
    lowered = lower_abstract_train_step(name, batch, precision, accum, remat, frozen)
    t = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t


@functools.cache
def train_step_flops(name: str, batch: int, precision: str, remat: bool = False, frozen: tuple = ()) -> float | None:
    """XLA's FLOP count of one train step of a global batch, lowered with the attention materialised:
    the same maths without loops, since XLA counts a loop body once (the chunked attention's steps
    and gradient accumulation's microbatches would be counted once each)."""
    return lowered_flops(lower_abstract_train_step(name, batch, precision, 1, remat, frozen, "materialized"))


MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

# (microbatches, remat, frozen) of the memory table: accumulation alone, then with rematerialisation,
# then the image encoder frozen (MedSAM-style fine-tuning of the prompt encoder and decoder).
MEMORY_SETTINGS = ((1, False, ()), (4, False, ()), (8, False, ()), (1, True, ()), (8, True, ()),
                   (1, False, ("image_encoder/.*",)))


def vit_b_memory_rows(batch: int, precision: str = "bfloat16") -> list[tuple]:
    """XLA's memory plan of the ViT-B train step for each of MEMORY_SETTINGS: the temporaries
    (activations kept for the backward pass, workspace) against the arguments (parameters, Adam
    moments, batch), the ratio of temporaries to the first setting's, and the step's FLOPs
    (`train_step_flops`: the same for any number of microbatches)."""
    rows, base = [], None
    for accum, remat, frozen in MEMORY_SETTINGS:
        compiled, compile_s = compile_abstract_train_step("vit_b", batch, precision, accum, remat, frozen)
        mem = compiled.memory_analysis()
        temp, args = mem.temp_size_in_bytes / 2**30, mem.argument_size_in_bytes / 2**30
        base = base or temp
        tflop = f"{train_step_flops('vit_b', batch, precision, remat, frozen) / 1e12:.2f}"
        rows.append((batch, accum, "on" if remat else "off", ", ".join(frozen) or "-", f"{temp:.2f}", f"{args:.2f}",
                     f"{temp / base:.3f}x", tflop, f"{compile_s:.1f}"))
        print(f"memory: {rows[-1]}", flush=True)
    return rows


def attention_backward_rows(batch: int = 1, repeats: int = 3) -> list[tuple]:
    """A ViT-B global block's attention (12 heads, 64 x 64 tokens, head dim 64, float32) differentiated
    with respect to q, k, v and the relative-position tables, each chunk's scores stored for the
    backward pass against recomputed there (`recompute_in_backward`): XLA's temporaries for this
    machine's chunk plan and the accelerators' one, and on this machine the median seconds of
    `repeats` timed calls after a warm-up."""
    import jax.numpy as jnp
    from radsam_jax.model import image_encoder as ie

    heads, (h, w), hd = 12, (64, 64), 64
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(key, (batch, heads, h * w, hd), jnp.float32) for key in keys[:3])
    rel_h, rel_w = (0.1 * jax.random.normal(key, (n, n, hd), jnp.float32) for key, n in zip(keys[3:], (h, w)))
    rows, stored = [], {}
    for backend in (jax.default_backend(), "gpu" if jax.default_backend() == "cpu" else "cpu"):
        plan = ie.chunk_plan(batch, heads, (h, w), backend)
        for recompute in (False, True):
            loss = lambda *a: jnp.sum(ie.attention_query_chunked(*a, (h, w), hd**-0.5, plan, recompute))
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(q, k, v, rel_h, rel_w).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
            seconds = "-"
            if backend == jax.default_backend():
                seconds = time_call(blocking(lambda: compiled(q, k, v, rel_h, rel_w)), repeats=repeats)
            base = stored.setdefault(backend, (temp, seconds))
            rows.append((f"{backend} {plan}", batch, "recomputed" if recompute else "stored", f"{temp:.3f}",
                         f"{temp / base[0]:.3f}x", "-" if seconds == "-" else f"{seconds:.3f}",
                         "-" if seconds == "-" else f"{seconds / base[1]:.3f}x"))
            print(f"attention backward: {rows[-1]}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the small config")
    parser.add_argument("--batch", type=int, default=4, help="batch of the small config")
    parser.add_argument("--skip_vit_b", action="store_true", help="skip the ViT-B FLOPs and memory table (its CPU compiles take minutes)")
    parser.add_argument("--time_vit_b", action="store_true",
                        help="also run (not only compile) ViT-B bf16 batch 2: for GPU/TPU machines")
    parser.add_argument("--memory_batch", type=int, default=8,
                        help="global batch of the ViT-B memory table (gradient accumulation, remat); 0 skips it")
    parser.add_argument("--cpu_scheduler", choices=("default", "memory"), default="default",
                        help="XLA's CPU instruction scheduler: its default, which orders work for concurrency, or the "
                             "memory-minimising one (--xla_cpu_enable_concurrency_optimized_scheduler=false), under "
                             "which the memory plan shows what remat saves")
    parser.add_argument("--out", help="default: benchmarks/results/train_throughput.md, or "
                                       "train_throughput_memory_scheduler.md with --cpu_scheduler memory")
    args = parser.parse_args()
    if args.cpu_scheduler == "memory":  # read when the backend starts, which the first jax.devices() does
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_SCHEDULER_FLAG}".strip()
    name = "train_throughput_memory_scheduler.md" if args.cpu_scheduler == "memory" else "train_throughput.md"
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / name)

    dev = jax.devices()[0]
    rows = []
    r = images_per_s(args.steps, args.batch, "float32")
    rows.append(("small (256 px)", "float32", args.batch, f"{r['images_per_s']:.2f}", f"{r['step_s']:.3f}",
                 "-", f"{r['compile_s']:.1f}"))
    if not args.skip_vit_b:
        rows.append(("vit_b (1024 px)", "bfloat16", 2, "not run", "-", f"{train_step_flops('vit_b', 2, 'bfloat16') / 1e12:.2f}",
                     "-"))
    if args.time_vit_b:
        r = images_per_s(args.steps, 2, "bfloat16", "vit_b")
        rows.append(("vit_b (1024 px)", "bfloat16", 2, f"{r['images_per_s']:.2f}", f"{r['step_s']:.3f}", "-",
                     f"{r['compile_s']:.1f}"))
    header = ("model", "precision", "batch", "images/s", "s/step", "TFLOP/step (XLA)", "compile s")
    lines = [f"Train step on {dev.platform} ({dev.device_kind}, {os.cpu_count()} cores visible, "
             f"{platform.processor() or platform.machine()}), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}", ""]
    lines += markdown_table(header, rows)
    lines += ["", "FLOPs: `jax.jit(train_step).lower(abstract state, abstract batch).cost_analysis()['flops']` with "
              "the encoder's attention materialised (the same maths without loops: XLA counts a loop body once), "
              "forward + backward + Adam update of one global batch (XLA's count: a multiply-add is 2 FLOPs)."]
    header = ("chunk plan (images, heads, query rows)", "batch", "chunk scores", "temporaries GiB", "ratio",
              "s fwd+bwd", "time ratio")
    lines += ["", f"ViT-B global attention, float32, differentiated (gradient of q, k, v and the relative-position "
              f"tables); seconds on {dev.platform}, median of 3 after a warm-up; the other backend's plan is "
              "compiled here, not run:", ""]
    lines += markdown_table(header, attention_backward_rows())
    if args.memory_batch > 0 and not args.skip_vit_b:
        header = ("global batch", "microbatches", "remat", "frozen", "temporaries GiB", "arguments GiB",
                  "temporaries ratio", "TFLOP/step (XLA)", "compile s")
        scheduler = ""
        if dev.platform == "cpu":
            memory = MEMORY_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", "")
            scheduler = (f", XLA's {'memory-minimising' if memory else 'default (concurrency-optimised)'} CPU "
                         f"scheduler")
        lines += ["", f"ViT-B train step memory, bfloat16, one device (XLA's compiled memory plan on {dev.platform}"
                  f"{scheduler}; lowered, not run):", ""]
        lines += markdown_table(header, vit_b_memory_rows(args.memory_batch))
        lines += ["", "Temporaries: activations kept for the backward pass and workspace, what gradient accumulation "
                  "(`grad_accum_steps`) and `remat` reduce; arguments: parameters, Adam moments and the batch (the "
                  "state is donated, so the updated state reuses its buffers). Every setting without a frozen part is "
                  "the same update of the same global batch; a frozen part is not differentiated and has no Adam "
                  "moments."]
        if dev.platform == "cpu":
            lines += ["", "On the CPU, XLA's default scheduler orders instructions for concurrency, not memory: "
                      "under it the remat rows' temporaries equal the others' although the step recomputes (more "
                      "FLOPs), and every row's peak is higher than under the memory-minimising scheduler, which "
                      f"`--cpu_scheduler memory` (`XLA_FLAGS={MEMORY_SCHEDULER_FLAG}`, which a CPU training run can "
                      "set too) plans with, writing train_throughput_memory_scheduler.md: there remat lowers the "
                      "peak. The CPU backend also computes "
                      "bfloat16 matrix products in float32 and keeps their float32 outputs (e.g. each block's qkv "
                      "and MLP hidden activations) for the backward pass; a GPU's products output bfloat16, so its "
                      "plan should hold less (not measured). Gradient accumulation is a loop over microbatches and "
                      "holds on every backend."]
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
