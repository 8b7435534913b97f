"""Timing helpers shared by the benchmark scripts: warm-up, median of repeats, table output."""

import json
import os
import statistics
import time
from pathlib import Path

import jax


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


def blocking(fn):
    """Wraps a JAX function so timing waits for the device."""
    return lambda *a, **k: jax.block_until_ready(fn(*a, **k))


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device where the backend reports it (GPU/TPU), else None."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def compiled_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return (analysis or {}).get("flops")


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"


def write_table(rows: list[dict], path: str | os.PathLike, title: str) -> str:
    """Prints `rows` as a Markdown table and writes it, plus a JSON copy, next to `path`."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = [f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return text
