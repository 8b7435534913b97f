"""Volume inference speed: jitted propagation (VolumePredictor) vs. a straightforward per-slice loop.

    python benchmarks/volume_inference.py [--config small] [--checkpoint CKPT] [--image CT] [--out FILE]

Both run volume-level prompting on the same volume, prompt and bounds (default: the bundled
radsam_jax/assets/sample/ct.nii.gz, a copy of the shared ct-abdomen-3mm sample, the liver box of
its reference labels, the liver's slice extent):
- predictor: encoder over the slices in the bounds in chunks of --encoder-batch-size, then one
  jitted call (one lax.scan of prompt encoder + decoder, up and down in lockstep);
- loop: for each slice encode (batch of one), decode, copy the logits to the host, build the next
  mask prompt in NumPy (radsam_jax.inference.reference.per_slice_loop).
Each is run once to compile (warm-up), then timed --repeats times (best is reported). Without
--checkpoint the model has random weights (speed does not depend on them). Writes a Markdown table
to --out (default benchmarks/results/volume_inference_<device>.md) and prints the speed-up.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from radsam_jax.inference.cli import SAMPLE_DIR
LIVER_V1 = 5  # TotalSegmentator v1 id of the liver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--checkpoint")
    ap.add_argument("--image", default=str(SAMPLE_DIR / "ct.nii.gz"))
    ap.add_argument("--labels", default=str(SAMPLE_DIR / "labels.nii.gz"))
    ap.add_argument("--label-id", type=int, default=LIVER_V1)
    ap.add_argument("--encoder-batch-size", type=int, default=None, help="default: VolumePredictor's (1 on a CPU, 8 on a GPU/TPU)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--whole-volume", action="store_true", help="bounds = every slice (default: the object's extent)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from radsam_jax.evaluate.metrics import dice
    from radsam_jax.inference import SliceFrame, VolumePredictor
    from radsam_jax.inference.reference import per_slice_loop
    from radsam_jax.inference.volume_predictor import default_encoder_batch_size
    from radsam_jax.io import load_label_map, load_volume
    from radsam_jax.model import RadSam, abstract_variables, load_model_config

    if args.encoder_batch_size is None:
        args.encoder_batch_size = default_encoder_batch_size()

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if args.checkpoint:
        from radsam_jax.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint, dtype=dtype)
    else:
        config = load_model_config(args.config)
        rng = np.random.default_rng(0)
        variables = jax.tree_util.tree_map_with_path(
            lambda p, s: ((1.0 if "scale" in jax.tree_util.keystr(p) else 0.0) + rng.normal(0, 0.05, s.shape)).astype(np.float32),
            abstract_variables(config))
        model = RadSam(config, variables, dtype=dtype)
    volume = load_volume(args.image)
    # Slices and the box are on the grid the predictor's prompts address: the S/I axis last.
    ref = SliceFrame.from_affine(volume.affine, volume.array.shape).axial(load_label_map(args.labels, like=volume) == args.label_id)
    nz = ref.shape[2]
    zs = np.flatnonzero(ref.any(axis=(0, 1)))
    lo, hi = (0, nz - 1) if args.whole_volume or zs.size == 0 else (int(zs[0]), int(zs[-1]))
    k = int(np.argmax(ref.sum(axis=(0, 1))))  # the slice with the largest area
    xs, ys = np.nonzero(ref[:, :, k])
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    n = hi - lo + 1
    device = jax.devices()[0]
    print(f"model {model.config.name} ({model.num_params() / 1e6:.1f} M params, {args.dtype}) on {device.platform} "
          f"({device.device_kind}); volume {volume.array.shape}, prompt slice {k}, bounds {lo}..{hi} ({n} slices)")

    def run_predictor():
        p = VolumePredictor(model, encoder_batch_size=args.encoder_batch_size, dtype=dtype, vanish_policy="continue")
        t0 = time.perf_counter()
        p.set_volume(volume)
        p.encode_slices(lo, hi)
        jax.block_until_ready(p.embeddings)
        t1 = time.perf_counter()
        r = p.segment(k, box=box, bounds=(lo, hi))
        t2 = time.perf_counter()
        return {"encode_s": t1 - t0, "propagate_s": t2 - t1, "total_s": t2 - t0}, r

    def run_loop():
        p = VolumePredictor(model, dtype=dtype, vanish_policy="continue")
        p.set_volume(volume)
        _, _, t = per_slice_loop(p, k, box=box, bounds=(lo, hi))
        return {"encode_s": t["encode_s"], "propagate_s": t["total_s"] - t["encode_s"], "total_s": t["total_s"]}

    t = time.perf_counter()
    _, result = run_predictor()
    compile_predictor = time.perf_counter() - t
    t = time.perf_counter()
    run_loop()
    compile_loop = time.perf_counter() - t
    pred = min((run_predictor()[0] for _ in range(args.repeats)), key=lambda d: d["total_s"])
    loop = min((run_loop() for _ in range(args.repeats)), key=lambda d: d["total_s"])
    score = dice(result.mask, ref)

    rows = [("jitted predictor (chunked encoder + lax.scan)", pred, compile_predictor),
            ("per-slice loop (host round trip per slice)", loop, compile_loop)]
    lines = [
        f"# Volume inference: {model.config.name}, {args.dtype}, {device.platform} ({device.device_kind})",
        "",
        f"Volume {Path(args.image).name} {volume.array.shape}, box prompt on slice {k}, bounds {lo}..{hi} ({n} slices), "
        f"encoder batch {args.encoder_batch_size}, best of {args.repeats} after a warm-up run"
        + ("" if args.checkpoint else " (random weights)") + ".",
        "",
        "| method | encoder s | propagation s | propagation ms/slice | total s | slices/s | first run (compile) s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d, c in rows:
        lines.append(f"| {name} | {d['encode_s']:.3f} | {d['propagate_s']:.3f} | {1000 * d['propagate_s'] / n:.2f} | "
                     f"{d['total_s']:.3f} | {n / d['total_s']:.1f} | {c:.1f} |")
    lines += ["", f"Speed-up (loop total / predictor total): {loop['total_s'] / pred['total_s']:.2f}x; "
              f"propagation only: {loop['propagate_s'] / pred['propagate_s']:.2f}x. "
              f"Dice vs reference label {args.label_id}: {score:.3f}" + ("" if args.checkpoint else " (meaningless with random weights)") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"volume_inference_{device.platform}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
