"""Where a ViT-B encoder block spends its time on this CPU, and what XLA's YNNPACK fusions do to it.

    python -m benchmarks.cpu_blocks                  # ViT-B blocks at 1024, batch 1, 9 repeats
    python -m benchmarks.cpu_blocks --small          # the small model's blocks (seconds)

Two tables in benchmarks/results/cpu_blocks.md (rows also in cpu_blocks.json; with --small,
cpu_blocks_small.md / .json, so a quick run never replaces the ViT-B results):
  kernels  one global and one windowed block (the encoder's default path): the HLO instructions
           taking the most thunk time in a profiler trace (benchmarks.common.op_time_breakdown);
  library  each block compiled twice, with XLA's default CPU fusions (YNNPACK for dots and
           reductions in jax 0.10) and with `xla_cpu_experimental_ynn_fusion_type=""` (Eigen dots,
           XLA's own loops), timed interleaved in this process: median and min of the repeats.
"""

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import CPU_NO_YNNPACK, encoder_block, format_table, interleaved, op_time_breakdown
from radsam_jax.model import load_model_config

RESULTS = Path(__file__).parent / "results" / "cpu_blocks.md"
RESULTS_SMALL = RESULTS.with_name("cpu_blocks_small.md")
LIBRARIES = {"default (YNNPACK)": {}, "no YNNPACK (Eigen)": CPU_NO_YNNPACK}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the small model's blocks")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None,
                        help=f"Markdown output, JSON next to it (default {RESULTS.name}; with --small {RESULTS_SMALL.name})")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS_SMALL if args.small else RESULTS)
    return args


def main(argv=None):
    args = parse_args(argv)

    config = load_model_config("small" if args.small else "vit_b")
    kernels, runs, outputs = [], {}, {}
    for kind, window in (("global", 0), ("window", config.window_size)):
        compile, params, x = encoder_block(config, window)
        for library, options in LIBRARIES.items():
            compiled = compile(**options)
            run = lambda c=compiled, p=params, x=x: jax.block_until_ready(c(p, x))
            runs[(kind, library)] = run
            outputs[(kind, library)] = np.asarray(run())
            if not options:
                for row in op_time_breakdown(compiled, run, calls=3, top=10):
                    kernels.append({"block": kind, **row})
                    print(kernels[-1], flush=True)
    times = interleaved(runs, args.repeats, warmup=0)  # each ran once above
    library_rows = []
    for (kind, library), t in times.items():
        ref = outputs[(kind, next(iter(LIBRARIES)))]
        rel = float(np.linalg.norm(outputs[(kind, library)] - ref) / np.linalg.norm(ref))
        library_rows.append({"block": kind, "library": library, "median_ms": 1e3 * t["median_s"],
                             "min_ms": 1e3 * t["min_s"], "rel_err_vs_default": rel})
    title = f"{config.name} blocks, batch 1, {jax.devices()[0].platform} ({len(jax.devices())} device), jax {jax.__version__}"
    text = format_table(kernels, f"kernels: {title}") + "\n"
    text += format_table(library_rows, f"library: {title}, {args.repeats} interleaved repeats")
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"kernels": kernels, "library": library_rows}, indent=1))


if __name__ == "__main__":
    main()
