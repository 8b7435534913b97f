"""JAX against PyTorch segment_anything on this machine's CPU, with the same random ViT-B weights.

    python -m benchmarks.cpu_vs_torch            # full: 40-slice volume, 3 repeats
    python -m benchmarks.cpu_vs_torch --quick    # fewer slices/repeats, a few minutes on a free machine
    python -m benchmarks.cpu_vs_torch --sections encoder --repeats 7   # one section again

Sections (--sections, default all; each a row of the table written to --out, default
benchmarks/results/cpu_vs_torch_latest.md, + _raw.json):
  encoder  ViT-B image encoder, 1024x1024, batch 1;
  decoder  prompt encoder + mask decoder for one box prompt;
  volume   a volume end to end: JAX `VolumePredictor` (set_volume, segment with lax.scan propagation)
           against the paper-style PyTorch loop (per slice: preprocess, encode, decode with the
           previous binary mask as mask prompt, copy to host, next prompt in NumPy);
  memory   peak resident memory (VmHWM) of each side, each run alone in its own child process;
  flops    achieved FLOP/s of the encoder (cost_analysis and an analytic count) against a large
           float32 matrix product timed in the same run.

Timing discipline: JAX and PyTorch are timed interleaved in ONE child process (the machine is shared
and noisy), after warm-up, median of >= 3, PyTorch pinned to the thread count XLA's CPU client uses
(all cores in this process's affinity). Ratios are JAX time / PyTorch time (< 1: JAX is faster).
Both sides share the process's malloc: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m
benchmarks.cpu_vs_torch ...` backs both with transparent huge pages (fewer page faults on the large
buffers each call allocates afresh); the table's title says when it was set.
The weights: segment_anything's `sam_model_registry["vit_b"](checkpoint=None)` saved to a .pth and
converted with `convert_checkpoint` (radsam_jax.convert.reference), so both sides compute the same function.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from radsam_jax.intensity import DEFAULT_CT_WINDOW  # numpy only: imports no JAX

# Not results/cpu_vs_torch.md, the curated history of the runs that a new run would overwrite.
RESULTS = Path(__file__).parent / "results" / "cpu_vs_torch_latest.md"


def num_threads() -> int:
    return len(os.sched_getaffinity(0))


def peak_rss_gib() -> float:
    """This process's high-water resident set (VmHWM) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def vit_b_flops(image_size: int = 1024, dim: int = 768, depth: int = 12, heads: int = 12, window: int = 14,
                global_blocks: int = 4, out: int = 256) -> float:
    """Analytic multiply-add x 2 count of SAM's ViT-B encoder (what the reference computes, padded
    window tokens included)."""
    g = image_size // 16
    n = g * g
    hd = dim // heads
    nwin = math.ceil(g / window) ** 2
    nw = nwin * window * window  # tokens after padding to whole windows
    mlp = 2 * n * dim * 4 * dim * 2
    linear = lambda t: 2 * t * dim * 3 * dim + 2 * t * dim * dim  # qkv + proj
    attn = lambda b, t, s: 2 * 2 * b * heads * t * t * hd + 2 * 2 * b * heads * t * s * hd  # qk, pv; rel-pos h, w
    total = 2 * n * dim * 16 * 16 * 3  # patch embedding
    total += global_blocks * (linear(n) + mlp + attn(1, n, g))
    total += (depth - global_blocks) * (linear(nw) + mlp + attn(nwin, window * window, window))
    total += 2 * n * dim * out + 2 * n * out * out * 9  # neck
    return float(total)


# ---------------------------------------------------------------------------------------------
# The two sides. Each builder returns plain callables; imports stay inside so a memory child only
# loads the side it measures.
# ---------------------------------------------------------------------------------------------


def load_volume_crop(num_slices: int):
    """A `num_slices` crop around the middle of the bundled sample CT (512 x 512 x 112)."""
    import numpy as np

    from radsam_jax.inference.cli import SAMPLE_DIR
    from radsam_jax.io import Volume, load_volume

    path = SAMPLE_DIR / "ct.nii.gz"
    vol = load_volume(path)
    if num_slices > vol.array.shape[2]:
        raise ValueError(f"--slices {num_slices}: the sample {path} has {vol.array.shape[2]} slices")
    z0 = vol.array.shape[2] // 2 - num_slices // 2
    array = np.ascontiguousarray(vol.array[:, :, z0: z0 + num_slices], np.float32)
    return Volume(array, vol.affine, str(path)), f"sample ct.nii.gz z{z0}..{z0 + num_slices - 1}"


def box_for(shape_xy) -> tuple:
    """A box around the centre third of the slice, voxel coordinates (x0, y0, x1, y1)."""
    x, y = shape_xy
    return (x / 3, y / 3, 2 * x / 3, 2 * y / 3)


class JaxSide:
    def __init__(self, converted_dir, attention=None):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from radsam_jax.checkpoint import load_checkpoint

        self.jax, self.jnp, self.np = jax, jnp, np
        self.model = load_checkpoint(converted_dir)
        if attention:
            self.model = self.model.with_options(attention=attention)
        self.config = self.model.config

    def encoder(self, image_nhwc):
        x = self.jnp.asarray(image_nhwc)
        return lambda: self.jax.block_until_ready(self.model.encode_image(x))

    def encoder_flops(self, image_nhwc) -> dict:
        from benchmarks.common import compiled_flops
        from radsam_jax.model.sam import encode_images

        m = self.model
        lowered = encode_images.lower(m.variables, self.jnp.asarray(image_nhwc), config=m.config, dtype=m.dtype, attention=m.attention)
        out = {"cost_analysis_default": compiled_flops(lowered.compile())}
        ref = encode_images.lower(m.variables, self.jnp.asarray(image_nhwc), config=m.config, dtype=m.dtype, attention="materialized")
        out["cost_analysis_materialized"] = compiled_flops(ref.compile())
        return out

    def decoder(self, embeddings, box):
        emb = self.jnp.asarray(embeddings)
        b = self.np.asarray(box, self.np.float32)[None]
        return lambda: self.jax.block_until_ready(self.model.predict(emb, box=b))

    def volume(self, volume, box, encoder_batch_size: int):
        from radsam_jax.inference import VolumePredictor

        predictor = VolumePredictor(self.model, encoder_batch_size=encoder_batch_size, vanish_policy="continue")
        z = volume.array.shape[2]
        k = z // 2

        def warm_up():  # compiles the encoder chunk, the propagation and the upscaling on 3 slices
            predictor.set_volume(volume)
            predictor.segment(k, box=box, bounds=(max(0, k - 1), min(z - 1, k + 1)))

        def run():
            predictor.set_volume(volume)  # forgets cached embeddings: every slice is encoded again
            return predictor.segment(k, box=box, bounds=(0, z - 1)).mask

        return warm_up, run


class TorchSide:
    def __init__(self, pth, threads: int):
        import numpy as np
        import torch
        import torch.nn.functional as F

        from radsam_jax.convert.reference import build_torch_sam

        torch.set_num_threads(threads)
        self.torch, self.F, self.np = torch, F, np
        self.sam = build_torch_sam("vit_b", pth)
        self.mean = torch.tensor((123.675, 116.28, 103.53)).view(1, 3, 1, 1)
        self.std = torch.tensor((58.395, 57.12, 57.375)).view(1, 3, 1, 1)

    def encoder(self, image_nhwc):
        x = self.torch.from_numpy(self.np.ascontiguousarray(image_nhwc.transpose(0, 3, 1, 2)))

        def run():
            with self.torch.no_grad():
                return self.sam.image_encoder(x)

        return run

    def _decode(self, emb, box=None, mask=None):
        t = self.torch
        with t.no_grad():
            sparse, dense = self.sam.prompt_encoder(
                points=None, boxes=None if box is None else t.as_tensor(box, dtype=t.float32)[None],
                masks=None if mask is None else t.from_numpy(mask)[None, None],
            )
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=emb, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
        return low_res[0, 0].numpy(), float(iou[0, 0])  # copy to host

    def decoder(self, embeddings_nhwc, box):
        emb = self.torch.from_numpy(self.np.ascontiguousarray(embeddings_nhwc.transpose(0, 3, 1, 2)))
        return lambda: self._decode(emb, box=box)

    def preprocess(self, hu_slice):
        """(H, W) HU -> (1, 3, 1024, 1024): window, grey to RGB, resize longest side (bilinear,
        antialiased), normalise, zero-pad bottom/right (SAM's transform + the CT window)."""
        t, np = self.torch, self.np
        lo, width = DEFAULT_CT_WINDOW[0] - DEFAULT_CT_WINDOW[1] / 2, DEFAULT_CT_WINDOW[1]
        x = t.from_numpy(np.clip((hu_slice - lo) / width, 0, 1) * 255.0).float()[None, None].expand(1, 3, -1, -1)
        h, w = hu_slice.shape
        scale = 1024 / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        x = self.F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return self.F.pad(x, (0, 1024 - nw, 0, 1024 - nh))

    def volume(self, volume, box):
        """The paper-style loop from the middle slice up, then down (box on the first slice, then the
        previous slice's binary mask as the mask prompt)."""
        np = self.np
        array = volume.array
        z = array.shape[2]
        k0 = z // 2
        h, w = array.shape[1], array.shape[0]  # slice shown as array[:, :, k].T: (rows = Y, cols = X)
        scale = 1024 / max(h, w)
        box_in = np.asarray(box, np.float32) * scale

        def one(k, box=None, mask=None):
            with self.torch.no_grad():
                emb = self.sam.image_encoder(self.preprocess(np.ascontiguousarray(array[:, :, k].T)))
            logits, _ = self._decode(emb, box=box, mask=mask)
            return logits

        def run():
            out = np.zeros((z, 256, 256), np.float32)
            out[k0] = one(k0, box=box_in)
            for step, stop in ((1, z - 1), (-1, 0)):
                prev = (out[k0] > 0).astype(np.float32)
                for k in range(k0 + step, stop + step, step):
                    out[k] = one(k, mask=prev)
                    prev = (out[k] > 0).astype(np.float32)
            return out

        return (lambda: one(k0, box=box_in)), run


def matmul_rates(n: int, repeats: int, threads: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks.common import interleaved

    torch.set_num_threads(threads)
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    aj, at = jnp.asarray(a), torch.from_numpy(a)
    f = jax.jit(lambda x, y: x @ y)
    res = interleaved({"jax": lambda: jax.block_until_ready(f(aj, aj)), "torch": lambda: torch.mm(at, at)}, repeats)
    return {k: 2 * n**3 / v["median_s"] for k, v in res.items()}


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def child_prepare(args) -> dict:
    from radsam_jax.convert.reference import random_reference_checkpoint

    pth, dst = random_reference_checkpoint(args.workdir, "vit_b")
    return {"pth": str(pth), "converted": str(dst)}


def child_timing(args) -> dict:
    """Everything timed, JAX and PyTorch interleaved in this one process."""
    import jax
    import numpy as np

    from benchmarks.common import interleaved

    threads = num_threads()
    work = Path(args.workdir)
    jx = JaxSide(work / "radsam_vit_b", args.attention)
    th = TorchSide(work / "sam_vit_b.pth", threads)
    out = {"threads": threads, "jax": jax.__version__, "attention": jx.model.attention, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    image = np.random.default_rng(0).normal(size=(1, 1024, 1024, 3)).astype(np.float32)
    parts = args.sections.split(",")

    if "encoder" in parts or "decoder" in parts:
        # Encoder (+ its parity: same weights, so the embeddings must agree to float32 rounding).
        enc_j, enc_t = jx.encoder(image), th.encoder(image)
        emb_j, emb_t = np.asarray(enc_j()), enc_t().numpy().transpose(0, 2, 3, 1)
        out["encoder_rel_err"] = float(np.linalg.norm(emb_j - emb_t) / np.linalg.norm(emb_t))
    if "encoder" in parts:
        out["encoder"] = interleaved({"jax": enc_j, "torch": enc_t}, args.repeats)
        print("encoder", out["encoder"], flush=True)

    if "decoder" in parts:  # one box prompt, on the same embedding
        box = (300.0, 300.0, 700.0, 700.0)
        out["decoder"] = interleaved({"jax": jx.decoder(emb_j, box), "torch": th.decoder(emb_j, box)}, max(args.repeats, 10), warmup=3)
        print("decoder", out["decoder"], flush=True)

    if "flops" in parts:  # FLOPs and the matrix-product peak, measured now (same load as the encoder timings)
        out["flops"] = jx.encoder_flops(image)
        out["flops"]["analytic"] = vit_b_flops()
        out["matmul"] = {"n": args.matmul_n, **matmul_rates(args.matmul_n, args.repeats, threads)}
        print("flops", out["flops"], out["matmul"], flush=True)

    if "volume" in parts:
        volume, source = load_volume_crop(args.slices)
        box = box_for(volume.array.shape[:2])
        warm_j, run_j = jx.volume(volume, box, args.encoder_batch_size)
        warm_t, run_t = th.volume(volume, box)
        warm_j(), warm_t()
        out["volume"] = interleaved({"jax": run_j, "torch": run_t}, args.volume_repeats, warmup=0)
        out["volume_source"], out["volume_slices"] = source, int(volume.array.shape[2])
        out["volume_encoder_batch"] = args.encoder_batch_size
        print("volume", out["volume"], flush=True)
    return out


def child_memory(args) -> dict:
    """One side, one workload, alone in this process: its VmHWM is that side's peak memory."""
    import numpy as np

    side, what = args.child.split(":")[1:]
    work = Path(args.workdir)
    base = None
    if side == "jax":
        s = JaxSide(work / "radsam_vit_b", args.attention)
    else:
        s = TorchSide(work / "sam_vit_b.pth", num_threads())
    base = peak_rss_gib()  # libraries + weights
    if what == "encoder":
        fn = s.encoder(np.random.default_rng(0).normal(size=(1, 1024, 1024, 3)).astype(np.float32))
        fn(), fn()
    else:
        volume, _ = load_volume_crop(args.memory_slices)
        box = box_for(volume.array.shape[:2])
        warm, run = s.volume(volume, box, args.encoder_batch_size) if side == "jax" else s.volume(volume, box)
        warm(), run()
    return {"peak_gib": peak_rss_gib(), "after_load_gib": base}


# ---------------------------------------------------------------------------------------------
# Parent: runs the children, builds the table
# ---------------------------------------------------------------------------------------------


def run_child(args, name: str) -> dict:
    out = Path(args.workdir) / f"{name.replace(':', '_')}.json"
    cmd = [sys.executable, "-m", "benchmarks.cpu_vs_torch", "--child", name, "--child-out", str(out), *args.passthrough]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode:
        return {"error": f"child {name} exited {proc.returncode}"}
    result = json.loads(out.read_text())
    result["child_wall_s"] = time.perf_counter() - t0
    return result


def build_rows(t: dict, mem: dict) -> list[dict]:
    """The table's rows for the sections that ran (`t`: the timing child's output, `mem`: the memory children's)."""
    rows = []

    def timed(section, what):
        j, p = t[section]["jax"]["median_s"], t[section]["torch"]["median_s"]
        return {"measurement": what, "jax_s": j, "torch_s": p, "jax/torch": j / p}

    if "encoder" in t:
        runs = lambda side: "/".join(f"{x:.1f}" for x in t["encoder"][side]["all_s"])  # noqa: E731
        rows.append({**timed("encoder", "ViT-B encoder 1024, batch 1 (s)"),
                     "note": f"rel. err. JAX vs torch embeddings {t['encoder_rel_err']:.1e}; runs JAX {runs('jax')}, torch {runs('torch')}"})
    if "decoder" in t:
        rows.append({**timed("decoder", "decoder, 1 box prompt (s)"), "note": "prompt encoder + mask decoder"})
    if "volume" in t:
        n = t["volume_slices"]
        rows.append({**timed("volume", f"volume {n} slices end to end (s)"),
                     "note": f"{t['volume_source']}; JAX encoder batch {t['volume_encoder_batch']}; per slice: JAX {t['volume']['jax']['median_s'] / n:.2f} s, torch {t['volume']['torch']['median_s'] / n:.2f} s"})
    for what in ("encoder", "volume"):
        j, p = mem.get(f"mem:jax:{what}", {}), mem.get(f"mem:torch:{what}", {})
        if "peak_gib" in j and "peak_gib" in p:
            rows.append({"measurement": f"peak RSS, {what} (GiB)", "jax_s": j["peak_gib"], "torch_s": p["peak_gib"],
                         "jax/torch": j["peak_gib"] / p["peak_gib"],
                         "note": f"VmHWM of a child running only that side; after loading weights: JAX {j['after_load_gib']:.2f}, torch {p['after_load_gib']:.2f}"})
    if "flops" not in t:
        return rows
    f, mm = t["flops"], t["matmul"]
    analytic = vit_b_flops()  # recomputed: the child's copy may come from an older version of this file
    if "encoder" in t:
        enc_j, enc_t = t["encoder"]["jax"]["median_s"], t["encoder"]["torch"]["median_s"]
        rows.append({"measurement": "encoder GFLOP/s (analytic FLOPs)", "jax_s": analytic / enc_j / 1e9, "torch_s": analytic / enc_t / 1e9,
                     "jax/torch": enc_t / enc_j,
                     "note": f"of each library's own {mm['n']}^3 f32 matmul rate: JAX {analytic / enc_j / mm['jax']:.0%}, torch {analytic / enc_t / mm['torch']:.0%}"})
    rows.append({"measurement": f"f32 matmul {mm['n']}^3 GFLOP/s", "jax_s": mm["jax"] / 1e9, "torch_s": mm["torch"] / 1e9,
                 "jax/torch": mm["jax"] / mm["torch"], "note": "the practical peak of this CPU under the current load"})
    ca = f.get("cost_analysis_default")
    cm = f.get("cost_analysis_materialized")
    rows.append({"measurement": "encoder TFLOP/image", "jax_s": (ca or float("nan")) / 1e12, "torch_s": analytic / 1e12,
                 "jax/torch": (ca or float("nan")) / analytic,
                 "note": f"jax_s column = XLA cost_analysis ({t['attention']}), torch_s column = analytic count; "
                         f"cost_analysis with 'materialized' attention: {(cm or float('nan')) / 1e12:.3f}"})
    return rows


SECTIONS = ("encoder", "decoder", "flops", "volume", "memory")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 slices, fewer repeats")
    parser.add_argument("--slices", type=int, default=None, help="volume slices (default 40, quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="encoder repeats (default 5, quick 3)")
    parser.add_argument("--volume-repeats", type=int, default=None, help="volume repeats (default 3, quick 1)")
    parser.add_argument("--encoder-batch-size", type=int, default=1,
                        help="JAX volume run's slices per encoder call (default 1, VolumePredictor's default on a CPU)")
    parser.add_argument("--attention", default=None, help="JAX attention implementation (default: the model's)")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--memory-slices", type=int, default=8,
                        help="slices for the memory children (peak memory depends on the encoder batch, not the slice count)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.slices = args.slices or (8 if args.quick else 40)
    args.repeats = args.repeats or 3 if args.quick else args.repeats or 5
    args.volume_repeats = args.volume_repeats or (1 if args.quick else 3)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")

    if args.child:
        fn = {"prepare": child_prepare, "timing": child_timing}.get(args.child, child_memory)
        Path(args.child_out).write_text(json.dumps(fn(args), indent=1))
        return

    own_tmp = None
    if args.workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="cpu_vs_torch_")
        args.workdir = own_tmp.name
    args.passthrough = ["--workdir", args.workdir, "--slices", str(args.slices), "--repeats", str(args.repeats),
                        "--volume-repeats", str(args.volume_repeats), "--encoder-batch-size", str(args.encoder_batch_size),
                        "--matmul-n", str(args.matmul_n), "--memory-slices", str(args.memory_slices),
                        "--sections", args.sections]
    if args.attention:
        args.passthrough += ["--attention", args.attention]
    prep = run_child(args, "prepare")
    if "error" in prep:
        sys.exit(prep["error"])
    mem = {}
    if "memory" in sections:
        for name in ("mem:jax:encoder", "mem:torch:encoder", "mem:jax:volume", "mem:torch:volume"):
            mem[name] = run_child(args, name)
            print(name, mem[name], flush=True)
    timing = run_child(args, "timing") if set(sections) - {"memory"} else None
    raw = {"timing": timing, "memory": mem, "args": {k: v for k, v in vars(args).items() if k != "passthrough"}}
    out = Path(args.out)
    if timing and "error" not in timing:
        from benchmarks.common import write_table

        title = (f"JAX vs PyTorch on CPU ({timing['threads']} threads, jax {timing['jax']}, attention "
                 f"'{timing['attention']}'{', ' + timing['xla_flags'] if timing['xla_flags'] else ''}"
                 f"{', GLIBC_TUNABLES=' + timing['glibc_tunables'] if timing.get('glibc_tunables') else ''}; medians, "
                 f"jax/torch = JAX's value over torch's: < 1 = JAX faster/smaller for times and memory, > 1 = JAX faster for rates)")
        write_table(build_rows(timing, mem), out, title)
        out.with_name(out.stem + "_raw.json").write_text(json.dumps(raw, indent=1))
    else:
        print(json.dumps(raw, indent=1))
    if own_tmp is not None:
        own_tmp.cleanup()


if __name__ == "__main__":
    main()
