"""GPU benchmark in one script: encoder slices/s (ViT-B/L, float32/bfloat16, batch 1/8/32, attention
implementations; each bfloat16 row's error against the float32 one), bfloat16 parity per attention path,
PyTorch segment_anything on the same device, propagation ms/slice, the training step's images/s with
utilisation (FLOPs: XLA's count of the lowered program, `common.lowered_flops`), a per-kernel profile of one
global and one windowed block (`--sections profile`: which fusions take the time), the attention op
alone per implementation (`--sections attention`), and the encoder under alternative XLA options
(`--sections variants`).

    python -m benchmarks.gpu_benchmark --out benchmarks/results/gpu     # on a GPU
    python -m benchmarks.gpu_benchmark --small --out /tmp/bench         # shrunk, runs on a CPU

Utilisation is measured FLOP/s over a large bf16 matrix product timed in the same run. Each section
records its error and the script goes on, so one failure does not lose the other numbers.
"""

import argparse
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (CPU_NO_YNNPACK, blocking, device_name, encoder_block, interleaved,
                               executable_bytes, lowered_flops, op_time_breakdown, peak_device_bytes, time_call,
                               write_table)
from radsam_jax.model import RadSam, init_variables, load_model_config
from radsam_jax.model.sam import encode_images


def matmul_rate(n: int, dtype) -> float:
    """FLOP/s of an n x n x n matrix product: the machine's practical peak for this dtype."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    seconds = time_call(blocking(lambda: f(a, a)), repeats=5)
    return 2 * n**3 / seconds


def random_variables(config, seed: int = 0) -> dict:
    """Random weights (init from key `seed`, plus noise from `seed + 1`, which also fills SAM's
    zero-initialised position tables so every path of the encoder is exercised), one program."""
    def make():
        leaves, tree = jax.tree.flatten(init_variables(config, jax.random.key(seed)))
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

    return jax.jit(make)()


def max_slice_rel_error(out, reference) -> float:
    """The largest relative L2 error of one slice of `out` against `reference` (both (B, ...))."""
    out, reference = (np.asarray(x, np.float32).reshape(len(x), -1) for x in (out, reference))
    return float(np.max(np.linalg.norm(out - reference, axis=1) / np.linalg.norm(reference, axis=1)))


def encoder_rows(args, peak_bf16: float) -> list[dict]:
    """The rows of `args.encoder_plan` in order, each printed as soon as it is timed. The second row of
    a model and batch timed in both dtypes reports the bfloat16 output's error against the float32 one
    (the same weights and images), which costs no compile."""
    rows, variables, per_slice_flops, outputs = [], {}, {}, {}
    for name, dtype_name, attention, batch in args.encoder_plan:
        config = load_model_config(name)
        row = {"model": config.name, "dtype": dtype_name, "attention": attention, "batch": batch}
        try:
            dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
            if name not in variables:
                variables[name] = random_variables(config)
            images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, config.image_size, config.image_size, 3)), jnp.float32)
            # Counted once per model and dtype (lowered, not compiled), on one slice with the attention
            # materialised: the same maths without the chunked path's loops, whose bodies XLA counts once.
            if (name, dtype_name) not in per_slice_flops:
                per_slice_flops[name, dtype_name] = lowered_flops(encode_images.lower(
                    variables[name], images[:1], config=config, dtype=dtype, attention="materialized"))
            t0 = time.perf_counter()
            compiled = encode_images.lower(variables[name], images, config=config, dtype=dtype, attention=attention).compile()
            row["compile_s"] = time.perf_counter() - t0
            out = jax.block_until_ready(compiled(variables[name], images))  # also the warm-up
            seconds = time_call(blocking(lambda: compiled(variables[name], images)), repeats=args.repeats, warmup=0)
            row["ms_per_batch"] = seconds * 1e3
            row["slices_per_s"] = batch / seconds
            row["executable_gib"] = (executable_bytes(compiled) or 0) / 2**30 or None
            row["process_peak_gib"] = (peak_device_bytes() or 0) / 2**30 or None
            if flops := per_slice_flops[name, dtype_name]:
                row["tflops_per_s"] = flops * batch / seconds / 1e12
                row["of_matmul_peak"] = flops * batch / seconds / peak_bf16
            outputs[name, batch, dtype_name] = np.asarray(out, np.float32)
            if (name, batch, "float32") in outputs and (name, batch, "bfloat16") in outputs:
                row["bf16_max_slice_rel_err_vs_f32"] = max_slice_rel_error(outputs[name, batch, "bfloat16"],
                                                                            outputs[name, batch, "float32"])
        except Exception as e:  # keep going: one OOM must not lose the other rows
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(row, flush=True)
        rows.append(row)
    return rows


def block_rows(args) -> list[dict]:
    """One global and one windowed ViT-B block timed alone per attention path: where the encoder's time goes.

    The encoder is 2 (small) or 4 (ViT-B) global blocks plus the windowed rest, patch embedding and neck;
    these rows say which attention path wins for each block type on this device.
    """
    config = load_model_config("small" if args.small else "vit_b")
    batch = 2 if args.small else 8
    rows = []
    for kind, window in (("global", 0), ("window", config.window_size)):
        for attention in ("materialized", "chunked", "fused"):
            if kind == "window" and attention == "chunked" and jax.default_backend() != "cpu":
                continue  # accelerators compute windows whole (chunk_plan): the materialized row
            row = {"model": config.name, "block": kind, "attention": attention, "dtype": "bfloat16", "batch": batch}
            try:
                compile, params, x = encoder_block(config, window, attention, jnp.bfloat16, batch)
                fn = compile()
                seconds = time_call(blocking(lambda: fn(params, x)), repeats=args.repeats)
                row["ms_per_slice"] = seconds / batch * 1e3
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(row, flush=True)
            rows.append(row)
    return rows


def profile_rows(args) -> list[dict]:
    """The kernels of one global and one windowed block in the encoder's default setting (bfloat16 with
    "auto" attention on accelerators, float32 on CPUs), batch 8 (small: 2), from a profiler trace."""
    from radsam_jax.model.image_encoder import resolve_attention

    config = load_model_config("small" if args.small else "vit_b")
    batch = 2 if args.small else 8
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    attention = resolve_attention("auto", dtype)
    rows = []
    for kind, window in (("global", 0), ("window", config.window_size)):
        compile, params, x = encoder_block(config, window, attention, dtype, batch)
        compiled = compile()
        head = {"model": config.name, "block": kind, "attention": attention, "dtype": jnp.dtype(dtype).name, "batch": batch}
        for row in op_time_breakdown(compiled, blocking(lambda: compiled(params, x)), calls=args.repeats):
            rows.append({**head, **row, "ms_per_slice": row["ms_per_call"] / batch})
            print(rows[-1], flush=True)
    return rows


def _cudnn_attention_unpadded_v(q, k, v, rel_h, rel_w, grid, scale):
    """`attention_fused` without padding V to the folded head dim, in the (B, N, T, H) layout the
    encoder has (no transposes): cuDNN >= 9.10 on Hopper takes V with its own head dim. Only jax's
    private cuDNN wrapper exposes that (jax.nn.dot_product_attention needs equal head dims), so it
    is measured here before the encoder uses it: ViT-B's global blocks would multiply the
    probabilities by 64 value channels instead of 192."""
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    from radsam_jax.model.image_encoder import fold_rel_pos_into_qk

    q_aug, k_aug = fold_rel_pos_into_qk(q, k, rel_h, rel_w, grid, scale)
    return cudnn_attention(q_aug, k_aug, v, scale=1.0, qkv_layout="BNTH")


def attention_rows(args) -> list[dict]:
    """The attention op alone, bfloat16, in a ViT-B global block (64 x 64 tokens) and a windowed one
    (25 windows of 14 x 14 per image), batch 8: each implementation's ms per slice and its relative
    error against the float32 materialised reference."""
    from radsam_jax.model.image_encoder import attention_fused, attention_materialized

    config = load_model_config("small" if args.small else "vit_b")
    batch, grid = (2, config.image_size // config.patch_size) if args.small else (8, 64)
    heads, hd = config.encoder_heads, config.encoder_dim // config.encoder_heads
    implementations = {
        "materialized": attention_materialized,
        "fused (jax.nn, V padded)": attention_fused,
        "fused (cuDNN, V unpadded, BNTH)": _cudnn_attention_unpadded_v,
    }
    rows = []
    for kind, side in (("global", grid), ("window", config.window_size)):
        images = batch * (-(-grid // side)) ** 2  # windows of the zero-padded grid count as images
        keys = jax.random.split(jax.random.key(0), 5)
        q, k, v = (jax.random.normal(key, (images, heads, side * side, hd)) for key in keys[:3])
        rel_h, rel_w = (0.1 * jax.random.normal(key, (side, side, hd)) for key in keys[3:])
        args_f32 = (q, k, v, rel_h, rel_w, (side, side), hd**-0.5)
        reference = jax.jit(attention_materialized, static_argnums=(5, 6))(*args_f32)
        args_bf16 = tuple(x.astype(jnp.bfloat16) for x in args_f32[:5]) + args_f32[5:]
        for name, fn in implementations.items():
            row = {"model": config.name, "block": kind, "attention": name, "dtype": "bfloat16", "batch": batch}
            try:
                f = jax.jit(fn, static_argnums=(5, 6))
                out = f(*args_bf16).astype(jnp.float32)
                row["rel_err_vs_f32"] = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
                row["ms_per_slice"] = time_call(blocking(lambda: f(*args_bf16)), repeats=args.repeats) / batch * 1e3
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(row, flush=True)
            rows.append(row)
    return rows


# XLA options tried against the default in `--sections variants` (one executable each, same process).
# An option this jaxlib does not know fails its row only.
GPU_VARIANTS = {
    "default": {},
    "cuBLAS for every GEMM (no Triton GEMM)": {"xla_gpu_enable_triton_gemm": False},
    "cuDNN LayerNorm": {"xla_gpu_enable_cudnn_layer_norm": True},
}
CPU_VARIANTS = {"default": {}, "no YNNPACK (Eigen dots)": CPU_NO_YNNPACK}


def variant_rows(args) -> list[dict]:
    """The encoder in its default setting (bfloat16 "auto" on accelerators, float32 on CPUs) compiled
    with each set of XLA options above, timed interleaved: which compiler settings are worth making
    the default, measured on the device itself."""
    from radsam_jax.model.image_encoder import resolve_attention

    config = load_model_config("small" if args.small else "vit_b")
    batch = 2 if args.small else 8
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    variables = random_variables(config)  # the encoder rows' init program: later steps find it in the compilation cache
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, config.image_size, config.image_size, 3)), jnp.float32)
    attention = resolve_attention("auto", dtype)
    runs, rows, reference = {}, {}, None
    for name, options in (CPU_VARIANTS if on_cpu else GPU_VARIANTS).items():
        rows[name] = {"model": config.name, "dtype": jnp.dtype(dtype).name, "attention": attention, "batch": batch,
                      "variant": name, "options": str(options)}
        try:
            t0 = time.perf_counter()
            lowered = encode_images.lower(variables, images, config=config, dtype=dtype, attention=attention)
            compiled = lowered.compile(compiler_options=options)
            rows[name]["compile_s"] = time.perf_counter() - t0
            out = np.asarray(compiled(variables, images), np.float32)
            reference = out if reference is None else reference
            rows[name]["rel_err_vs_default"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            runs[name] = blocking(lambda c=compiled: c(variables, images))
        except Exception as e:
            rows[name]["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print("compiled:", rows[name], flush=True)  # a run stopped by a time limit still shows these
    for name, t in interleaved(runs, max(args.repeats, 3), warmup=0).items():  # each ran once above
        rows[name]["ms_per_batch"] = 1e3 * t["median_s"]
        rows[name]["slices_per_s"] = batch / t["median_s"]
    for row in rows.values():
        print(row, flush=True)
    return list(rows.values())


def bf16_parity_rows(args) -> list[dict]:
    """Relative error of bfloat16 (and of each attention path) against float32 'chunked' on this device."""
    config = load_model_config("small" if args.small else "vit_b")
    variables = random_variables(config, seed=1)
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, config.image_size, config.image_size, 3)), jnp.float32)
    reference = RadSam(config, variables).encode_image(images)
    rows = []
    for dtype_name, attention in (("float32", "materialized"), ("float32", "fused"), ("bfloat16", "chunked"), ("bfloat16", "fused")):
        model = RadSam(config, variables, jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32, attention=attention)
        out = model.encode_image(images).astype(jnp.float32)
        rel = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
        rows.append({"model": config.name, "dtype": dtype_name, "attention": attention, "rel_error_vs_f32_chunked": rel})
        print(rows[-1], flush=True)
    return rows


def torch_rows(args) -> list[dict]:
    """segment_anything's encoder on the same device, float32 and bfloat16 autocast."""
    import torch

    from radsam_jax.convert.reference import import_segment_anything

    sam_model_registry, _ = import_segment_anything()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in (("vit_b",) if not args.small else ()):
        sam = sam_model_registry[name](checkpoint=None).to(device).eval()
        for dtype_name, batch in (("float32", 8), ("bfloat16", 8), ("bfloat16", 32)):
            x = torch.randn(batch, 3, 1024, 1024, device=device)

            def run(encoder=sam.image_encoder, x=x, bf16=dtype_name == "bfloat16"):  # bound now: both are deleted below
                with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=bf16):
                    encoder(x)
                if device == "cuda":
                    torch.cuda.synchronize()

            row = {"model": f"torch {name}", "dtype": dtype_name, "batch": batch}
            try:
                torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
                seconds = time_call(run, repeats=args.repeats)
                row["slices_per_s"] = batch / seconds
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            except Exception as e:  # PyTorch's materialised softmax runs out of memory at batch 32
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            del x
            torch.cuda.empty_cache() if device == "cuda" else None
            print(row, flush=True)
            rows.append(row)
        del sam
    return rows


def propagation_rows(args) -> list[dict]:
    """Volume inference with VolumePredictor: encoder over all slices, then one box propagated through them."""
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.io import Volume

    rows = []
    config = load_model_config("small" if args.small else "vit_b")
    variables = jax.jit(lambda r: init_variables(config, r))(jax.random.key(0))
    z, side = (16, 128) if args.small else (128, 512)
    rng = np.random.default_rng(0)
    array = rng.normal(0, 50, (side, side, z)).astype(np.float32)
    lo, hi = side * 3 // 10, side * 7 // 10
    array[lo:hi, lo:hi, :] += 200.0  # a bright block to segment
    volume = Volume(array, np.eye(4))
    for dtype_name, attention in (("bfloat16", "fused"), ("float32", "chunked")):
        dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
        model = RadSam(config, variables, dtype, attention=attention)
        predictor = VolumePredictor(model, encoder_batch_size=8 if args.small else 32)
        row = {"model": config.name, "dtype": dtype_name, "attention": attention, "slices": z}
        try:
            predictor.set_volume(volume)
            predictor.encode_slices(0, z - 1)  # compile
            predictor.set_volume(volume)
            t0 = time.perf_counter()
            predictor.encode_slices(0, z - 1)
            jax.block_until_ready(predictor.embeddings)
            row["encode_slices_per_s"] = z / (time.perf_counter() - t0)
            segment = lambda: predictor.segment(z // 2, box=(lo, lo, hi - 1, hi - 1), bounds=(0, z - 1))
            segment()  # compile
            seconds = time_call(segment, repeats=args.repeats, warmup=0)
            row["propagate_ms_per_slice"] = seconds / z * 1e3
            row["total_s"] = z / row["encode_slices_per_s"] + seconds
            row["end_to_end_slices_per_s"] = z / row["total_s"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        rows.append(row)
    return rows


def train_rows(args) -> list[dict]:
    """The sharded training step (forward + backward + Adam) on synthetic batches: images/s and FLOP rate.
    Each row is printed twice: "timed:" as soon as it is timed, then with its FLOPs (counting them
    lowers the step again: seconds of tracing)."""
    from benchmarks.train_throughput import synthetic_training_setup, train_step_flops

    rows = []
    name = "small" if args.small else "vit_b"
    # (precision, batch, remat, microbatches, attention), bfloat16 first; "auto" is cuDNN's fused
    # attention on a GPU in bf16
    settings = (("bfloat16", 8, False, 1, "chunked"), ("bfloat16", 8, False, 1, "auto"), ("bfloat16", 32, True, 1, "chunked"),
                ("bfloat16", 32, False, 4, "chunked"), ("float32", 8, False, 1, "chunked"))
    for precision, batch, remat, accum, attention in settings:
        row = {"model": name, "precision": precision, "batch": batch, "remat": remat, "microbatches": accum,
               "attention": attention}
        try:
            state, step, batches, mesh = synthetic_training_setup(name, precision, batch, remat, accum, attention)
            with jax.set_mesh(mesh):
                t0 = time.perf_counter()
                compiled = step.lower(state, batches[0]).compile()
                row["compile_s"] = time.perf_counter() - t0
                state, metrics = compiled(state, batches[0])
                jax.block_until_ready(metrics)
                steps = 3 if args.small else 10
                t0 = time.perf_counter()
                for i in range(steps):
                    state, metrics = compiled(state, batches[i % 2])
                jax.block_until_ready(metrics)
                seconds = (time.perf_counter() - t0) / steps
            row["images_per_s"] = batch / seconds
            row["executable_gib"] = (executable_bytes(compiled) or 0) / 2**30 or None
            row["process_peak_gib"] = (peak_device_bytes() or 0) / 2**30 or None
            print("timed:", row, flush=True)
            del state
            flops = train_step_flops(name, batch, precision, remat)  # without loops, which XLA counts once
            row["xla_tflop_per_step"] = flops / 1e12 if flops else None
            row["tflops_per_s"] = flops / seconds / 1e12 if flops else None
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        rows.append(row)
    return rows


SECTIONS = ("matmul", "blocks", "attention", "profile", "variants", "encoder", "parity", "propagation", "train", "torch")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--small", action="store_true", help="shrink everything so it runs on a CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder-rows", default=None,
                        help="only these encoder rows, comma-separated model:dtype (e.g. vit_l:float32)")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := sorted(set(sections) - set(SECTIONS)):
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # (model, dtype, attention, batch) in order of need: ViT-B bfloat16 (the 400 slices/s target), batch 8
    # first, then ViT-L float32 (never measured); the second dtype of a model and batch reports parity.
    if args.small:
        args.encoder_plan = [("small", "bfloat16", "fused", 4), ("small", "float32", "chunked", 4),
                             ("small", "float32", "chunked", 1)]
    else:
        args.encoder_plan = [
            ("vit_b", "bfloat16", "fused", 8), ("vit_b", "bfloat16", "fused", 32), ("vit_b", "bfloat16", "fused", 1),
            ("vit_b", "float32", "chunked", 8), ("vit_b", "bfloat16", "chunked", 8),
            ("vit_b", "float32", "chunked", 32), ("vit_b", "float32", "chunked", 1),
            ("vit_l", "float32", "chunked", 8), ("vit_l", "bfloat16", "fused", 8),
            ("vit_l", "float32", "chunked", 32), ("vit_l", "bfloat16", "fused", 32),
            ("vit_l", "float32", "chunked", 1), ("vit_l", "bfloat16", "fused", 1),
        ]
    if args.encoder_rows:
        keep = set(args.encoder_rows.split(","))
        args.encoder_plan = [row for row in args.encoder_plan if f"{row[0]}:{row[1]}" in keep]
        if not args.encoder_plan:
            parser.error(f"--encoder-rows {args.encoder_rows}: no row of the plan matches (model:dtype)")
    print("device:", device_name(), "jax", jax.__version__, flush=True)
    results = {"device": device_name(), "jax": jax.__version__}
    peak_bf16 = None
    if "matmul" in sections:
        n = 1024 if args.small else 8192
        peak_bf16 = matmul_rate(n, jnp.bfloat16)
        results["matmul"] = {"n": n, "bf16_tflops": peak_bf16 / 1e12, "f32_tflops": matmul_rate(n, jnp.float32) / 1e12}
        print(results["matmul"], flush=True)
    runners = {
        "blocks": lambda: block_rows(args),
        "attention": lambda: attention_rows(args),
        "profile": lambda: profile_rows(args),
        "variants": lambda: variant_rows(args),
        "encoder": lambda: encoder_rows(args, peak_bf16 or float("nan")),
        "parity": lambda: bf16_parity_rows(args),
        "propagation": lambda: propagation_rows(args),
        "train": lambda: train_rows(args),
        "torch": lambda: torch_rows(args),
    }
    for section, runner in runners.items():
        if section not in sections:
            continue
        try:
            rows = runner()
            write_table(rows, out / f"{section}.md", f"{section} on {device_name()}")
            results[section] = rows
        except Exception:
            results[section] = {"error": traceback.format_exc()[-2000:]}
            print(results[section]["error"], flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
