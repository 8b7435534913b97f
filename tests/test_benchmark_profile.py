"""The per-kernel profile helper of the benchmarks: events of a real trace matched to HLO instructions."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import hlo_instructions, op_time_breakdown


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
