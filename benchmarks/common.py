"""Timing helpers shared by the benchmark scripts: warm-up, median of repeats, table output."""

import collections
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# XLA CPU option: no YNNPACK fusions (Eigen dots, XLA's own loops), the alternative the CPU
# benchmarks time against the default.
CPU_NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def time_call(fn, *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time in seconds of `fn()` after warm-up; `fn` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """{name: {"median_s", "min_s", "all_s"}} of each fn (which must block), timed round-robin so
    machine load hits every side alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "all_s": t} for name, t in times.items()}


def encoder_block(config, window: int, attention: str = "chunked", dtype=jnp.float32, batch: int = 1):
    """(compiled apply, params, input) of one image-encoder block of `config` (window 0: global
    attention) on random tokens; `compile(**options)` gives an executable with other XLA options."""
    from radsam_jax.model.image_encoder import Block

    grid = config.image_size // config.patch_size
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, grid, grid, config.encoder_dim)), dtype)
    block = Block(config.encoder_heads, config.encoder_mlp_ratio, window, (grid, grid), attention, dtype)
    params = jax.jit(block.init)(jax.random.key(0), x)
    compile = lambda **options: jax.jit(block.apply).lower(params, x).compile(compiler_options=options or None)  # noqa: E731
    return compile, params, x


def blocking(fn):
    """Wraps a JAX function so timing waits for the device."""
    return lambda *a, **k: jax.block_until_ready(fn(*a, **k))


def peak_device_bytes() -> int | None:
    """The process's peak bytes in use so far on the first device, where the backend reports it
    (GPU/TPU), else None: a high-water mark over every earlier computation, never reset."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def executable_bytes(compiled) -> int | None:
    """Device memory one compiled computation needs by XLA's buffer plan: its arguments, outputs
    (less those aliased to arguments) and temporaries; the per-row figure, whatever ran before."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def lowered_flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered computation (a loop body counted once), never compiling it; None
    where it cannot be counted.

    `Lowered.cost_analysis()` counts on the CPU but gives None on a GPU PJRT plugin (jax 0.11: not
    implemented for C-API backends), and a compiled GPU executable's count misses the GEMMs handed
    to cuBLAS (~53 GFLOP per ViT-B slice instead of 0.96 TFLOP: utilisation ~18x too low). There the
    lowered HLO is counted by the CPU client instead, the same count Lowered.cost_analysis gives on a
    CPU, through jax's private `_jax.hlo_module_cost_analysis`: if that API moves, no FLOP figure.
    """
    try:
        flops = compiled_flops(lowered)
        if flops is None:
            from jax._src.lib import _jax

            module = lowered._lowering.hlo().as_hlo_module()
            flops = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)["flops"]
        return float(flops)
    except Exception:
        return None


def compiled_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled or lowered computation (a loop body counted once)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return (analysis or {}).get("flops")


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"


def markdown_table(header, rows) -> list[str]:
    """The lines of a Markdown table: `header` cells, then one line per row of cells."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows])


def format_table(rows: list[dict], title: str) -> str:
    """`rows` as a Markdown table under a `## title` heading."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = [f"## {title}", ""] + markdown_table(keys, [[fmt(r.get(k)) for k in keys] for r in rows])
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], path: str | os.PathLike, title: str) -> str:
    """Prints `rows` as a Markdown table and writes it, plus a JSON copy, next to `path`."""
    text = format_table(rows, title)
    print(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return text


_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_FUSION_KIND = re.compile(r"kind=(k\w+)")


def hlo_instructions(compiled) -> dict[str, tuple[str, str]]:
    """{instruction name: (opcode or fusion kind, the JAX op it came from)} of a compiled executable."""
    out = {}
    for line in compiled.as_text().splitlines():
        m = _HLO_LINE.match(line)
        if not m:
            continue
        kind, op = m.group(2), _OP_NAME.search(line)
        if kind == "fusion" and (k := _FUSION_KIND.search(line)):
            kind = f"fusion:{k.group(1)[1:].lower()}"
        out[m.group(1)] = (kind, op.group(1) if op else "")
    return out


def op_time_breakdown(compiled, run, calls: int = 3, top: int = 12) -> list[dict]:
    """Where one call of `compiled` spends its time: a jax.profiler trace of `calls` runs of `run`
    (which must call `compiled` and block), its events matched to the executable's HLO instructions.

    GPUs/TPUs: the device planes' "XLA Ops" line (kernel time). CPUs: the host threads' thunk events
    (two threads may run thunks at once, so the shares are of the summed thunk time). Rows: the `top`
    instructions by time per call, then one row for the rest.
    """
    instructions = hlo_instructions(compiled)
    run()  # warm
    with tempfile.TemporaryDirectory(prefix="op_profile_") as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(calls):
                run()
        xspace = next(Path(logdir).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(xspace))
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    if device:
        lines = [line for p in device for line in p.lines if line.name == "XLA Ops"] or [line for p in device for line in p.lines]
    else:
        lines = [line for p in planes if p.name.startswith("/host:CPU") for line in p.lines]
    totals = collections.Counter()
    for line in lines:
        for event in line.events:
            name = event.name.split(" ")[0].lstrip("%")  # some traces name an op by its HLO text
            if name in instructions:
                totals[name] += event.duration_ns
    if not totals:
        raise RuntimeError(f"no profiler event matched an HLO instruction (planes: {[p.name for p in planes]})")
    whole = sum(totals.values())
    rows = []
    for name, ns in totals.most_common(top):
        kind, op = instructions[name]
        rows.append({"instruction": name, "kind": kind, "jax_op": "/".join(op.split("/")[-3:]),
                     "ms_per_call": ns / calls / 1e6, "share": ns / whole})
    rest = whole - sum(totals[r["instruction"]] for r in rows)
    if rest:
        rows.append({"instruction": f"({len(totals) - len(rows)} others)", "kind": "", "jax_op": "",
                     "ms_per_call": rest / calls / 1e6, "share": rest / whole})
    return rows
