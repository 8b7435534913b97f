"""Helpers of the benchmarks: the per-kernel profile (events of a real trace matched to HLO
instructions) and the FLOP count of a lowered computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.lib import _jax

from benchmarks.common import hlo_instructions, lowered_flops, op_time_breakdown


def test_op_time_breakdown_names_the_executables_instructions():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
    compiled = jax.jit(lambda x: jnp.exp(x @ x).sum(axis=0)).lower(a).compile()
    instructions = hlo_instructions(compiled)
    assert any(kind.startswith("fusion") or kind == "dot" for kind, _ in instructions.values())

    rows = op_time_breakdown(compiled, lambda: jax.block_until_ready(compiled(a)), calls=2, top=2)
    named = [r for r in rows if not r["instruction"].startswith("(")]
    assert named and all(r["instruction"] in instructions for r in named)
    assert all(r["ms_per_call"] > 0 for r in rows)
    assert abs(sum(r["share"] for r in rows) - 1.0) < 1e-9
    assert [r["ms_per_call"] for r in named] == sorted((r["ms_per_call"] for r in named), reverse=True)


def test_lowered_flops_counts_on_the_cpu_client_where_lowered_cannot_and_never_compiles(monkeypatch):
    a = jnp.ones((64, 64), jnp.float32)
    lowered = jax.jit(lambda x: jnp.tanh(x @ x)).lower(a)
    expected = lowered.cost_analysis()["flops"]
    assert expected >= 2 * 64**3
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda *a, **k: pytest.fail("lowered_flops compiled"))
    assert lowered_flops(lowered) == expected

    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)  # as on a GPU PJRT plugin
    assert lowered_flops(lowered) == expected

    def moved(*args):
        raise AttributeError("hlo_module_cost_analysis")

    monkeypatch.setattr(_jax, "hlo_module_cost_analysis", moved)  # the private API gone: no figure
    assert lowered_flops(lowered) is None
