"""Model-level checks that need no PyTorch: sizes, attention paths, one compiled decoder for all prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radsam_jax.model import RadSam, abstract_variables, init_variables, load_model_config
from radsam_jax.model.image_encoder import (ATTENTION_IMPLEMENTATIONS, attention_materialized, attention_query_chunked,
                                            attention_with_rel_pos, chunk_plan, resolve_attention)
from radsam_jax.model.sam import _decode
from radsam_jax.prompts import make_prompts
from sam_reference import relative_error
from tiny_model import tiny_model_config

TINY = tiny_model_config()


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name, encoder_params",
    [("vit_b", 89_670_912), ("vit_l", 308_278_272), ("vit_h", 637_026_048)],
)
def test_preset_sizes_match_sam(name, encoder_params):
    variables = abstract_variables(load_model_config(name))
    assert n_params(variables["params"]["image_encoder"]) == encoder_params
    decoder = n_params(variables["params"]["prompt_encoder"]) + n_params(variables["params"]["mask_decoder"])
    assert 4.0e6 < decoder < 4.1e6  # sam-port-notes: about 4.06 M


def _attention_inputs(b, n, grid, hd, seed):
    h, w = grid
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h * w, hd)), jnp.float32) for _ in range(3))
    rel_h = jnp.asarray(rng.normal(size=(h, h, hd)) * 0.3, jnp.float32)
    rel_w = jnp.asarray(rng.normal(size=(w, w, hd)) * 0.3, jnp.float32)
    return q, k, v, rel_h, rel_w


@pytest.mark.parametrize("b, n, grid", [(1, 2, (14, 14)), (6, 2, (14, 14)), (1, 2, (40, 40)), (1, 2, (64, 64)), (2, 3, (64, 64))])
def test_attention_implementations_agree(b, n, grid):
    hd = 8
    q, k, v, rel_h, rel_w = _attention_inputs(b, n, grid, hd, grid[0] + b)
    with jax.default_matmul_precision("highest"):
        reference = attention_materialized(q, k, v, rel_h, rel_w, grid, hd**-0.5)
        for implementation in ATTENTION_IMPLEMENTATIONS:
            rel = relative_error(attention_with_rel_pos(q, k, v, rel_h, rel_w, grid, hd**-0.5, implementation), reference)
            print(f"attention {implementation} on {b}x{n}x{grid}: relative error {rel:.2e}")
            assert rel < 1e-5


@pytest.mark.parametrize("plan", [(1, 1, 4), (3, 2, 8), (6, 1, 16), (2, 4, 2), (6, 4, 16)])
def test_chunked_attention_any_plan_matches_materialized(plan):
    """Every way of stepping through images x heads x query rows (CPU and accelerator plans alike)."""
    grid, hd = (16, 12), 8
    q, k, v, rel_h, rel_w = _attention_inputs(6, 4, grid, hd, 0)
    with jax.default_matmul_precision("highest"):
        reference = attention_materialized(q, k, v, rel_h, rel_w, grid, hd**-0.5)
        assert relative_error(attention_query_chunked(q, k, v, rel_h, rel_w, grid, hd**-0.5, plan), reference) < 1e-5
    with pytest.raises(ValueError, match=r"chunk plan \(4, 1, 16\) does not divide batch 6"):
        attention_query_chunked(q, k, v, rel_h, rel_w, grid, hd**-0.5, (4, 1, 16))


@pytest.mark.parametrize("path", ["chunked", "chunked_stored", "fused"])
def test_attention_gradients_match_materialized(path):
    """Training differentiates the attention: the gradients (of q, k, v and both relative-position
    tables) of the chunked path, with each step's scores recomputed in the backward pass or stored,
    and of the fused one (XLA's here, cuDNN's on GPUs) are the reference's."""
    grid, hd = (16, 12), 8
    inputs = _attention_inputs(2, 4, grid, hd, 1)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, grid[0] * grid[1], hd)), jnp.float32)
    grads = lambda attention: jax.grad(lambda *a: jnp.sum(attention(*a) * weights), argnums=(0, 1, 2, 3, 4))(*inputs)
    attention = {
        "chunked": lambda *a: attention_query_chunked(*a, grid, hd**-0.5, (1, 2, 4)),
        "chunked_stored": lambda *a: attention_query_chunked(*a, grid, hd**-0.5, (1, 2, 4), recompute_in_backward=False),
        "fused": lambda *a: attention_with_rel_pos(*a, grid, hd**-0.5, "fused"),
    }[path]
    with jax.default_matmul_precision("highest"):
        reference = grads(lambda *a: attention_materialized(*a, grid, hd**-0.5))
        got = grads(attention)
    for name, g, want in zip(("q", "k", "v", "rel_h", "rel_w"), got, reference):
        assert relative_error(g, want) < 1e-5, name


def test_chunk_plans():
    # ViT-B at 1024 on a CPU: global blocks one head x 16 rows (1024 queries) per step; windowed
    # blocks (batch 8 -> 200 windows of 14x14) 5 windows of one head; small problems at once.
    assert chunk_plan(1, 12, (64, 64), "cpu") == (1, 1, 16)
    assert chunk_plan(200, 12, (14, 14), "cpu") == (5, 1, 14)
    assert chunk_plan(16, 3, (16, 16), "cpu") == (16, 3, 16)
    # Accelerators: all images and heads, 16-row blocks only above 32x32.
    assert chunk_plan(8, 12, (64, 64), "gpu") == (8, 12, 16)
    assert chunk_plan(200, 12, (14, 14), "gpu") == (200, 12, 14)


def test_attention_rejects_unknown_implementation():
    x = jnp.zeros((1, 1, 4, 2))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention_with_rel_pos(x, x, x, jnp.zeros((2, 2, 2)), jnp.zeros((2, 2, 2)), (2, 2), 1.0, "flash")


def test_auto_attention_picks_cudnn_only_for_gpu_half_precision():
    assert resolve_attention("auto", jnp.bfloat16, backend="gpu") == "fused"
    assert resolve_attention("auto", jnp.float16, backend="gpu") == "fused"
    assert resolve_attention("auto", jnp.float32, backend="gpu") == "chunked"  # cuDNN has no float32 kernel
    assert resolve_attention("auto", jnp.bfloat16, backend="cpu") == "chunked"
    assert resolve_attention("materialized", jnp.bfloat16, backend="gpu") == "materialized"  # explicit wins
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        resolve_attention("flash", jnp.float32)


def test_with_options_re_resolves_auto():
    variables = jax.eval_shape(lambda r: init_variables(TINY, r), jax.random.key(0))
    model = RadSam(TINY, variables)
    assert (model.requested_attention, model.attention) == ("auto", "chunked")  # this CPU
    assert model.with_options(dtype=jnp.bfloat16).requested_attention == "auto"  # resolved again for bf16
    assert RadSam(TINY, variables, attention="fused").with_options(dtype=jnp.float32).attention == "fused"


@pytest.fixture(scope="module")
def tiny_model():
    return RadSam(TINY, jax.jit(lambda r: init_variables(TINY, r))(jax.random.key(0)))


def test_one_compiled_decoder_serves_every_prompt_combination(tiny_model):
    m = tiny_model
    s = TINY.mask_size
    embeddings = m.encode_image(np.random.default_rng(0).normal(size=(2, 64, 64, 3)))
    pts = np.array([[[10, 12], [30, 40]], [[5, 6], [50, 20]]], np.float32)
    labels = np.array([[1, 0], [1, -1]])
    box = np.array([[4, 4, 40, 40], [10, 10, 60, 50]], np.float32)
    mask = (np.random.default_rng(1).random((2, s, s)) > 0.5).astype(np.float32)
    combos = {
        "point": dict(points=pts, point_labels=labels),
        "box": dict(box=box),
        "box+points": dict(points=pts, point_labels=labels, box=box),
        "mask": dict(mask=mask),
        "mask+points": dict(points=pts, point_labels=labels, mask=mask),
        "nothing": dict(),
    }
    before = _decode._cache_size()
    outputs = {}
    for name, kwargs in combos.items():
        prompts = make_prompts(2, s, num_points=4, **kwargs)
        logits, iou = m.decode(embeddings, prompts)
        assert logits.shape == (2, 4, s, s) and iou.shape == (2, 4)
        outputs[name] = np.asarray(logits)
    assert _decode._cache_size() - before == 1
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(outputs[a], outputs[b]), f"{a} and {b} gave the same masks"


def test_padding_points_switch_off_when_no_point_is_given(tiny_model):
    """All labels -1 is SAM with points=None: the point slots must not change the output."""
    m = tiny_model
    embeddings = m.encode_image(np.zeros((1, 64, 64, 3)))
    box = np.array([[4, 4, 40, 40]], np.float32)
    a = m.decode(embeddings, make_prompts(1, TINY.mask_size, box=box, num_points=1))[0]
    b = m.decode(embeddings, make_prompts(1, TINY.mask_size, box=box, num_points=7))[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(points=np.zeros((1, 2)), point_labels=np.ones((1, 2))), r"points must have shape \(B=1, N, 2\)"),
        (dict(points=np.zeros((1, 2, 2)), point_labels=np.array([[1, 2]])), "point_labels must be 1, 0 or -1; got 2"),
        (dict(points=np.zeros((1, 2, 2))), "points given without point_labels"),
        (dict(box=np.zeros((1, 3))), r"box must have shape \(B=1, 4\)"),
        (dict(mask=np.zeros((1, 8, 8))), r"mask must have shape \(B=1, 16, 16\)"),
    ],
)
def test_bad_prompts_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_prompts(1, 16, **kwargs)


def test_encode_image_checks_shape(tiny_model):
    with pytest.raises(ValueError, match=r"images must have shape \(B, 64, 64, 3\), got \(1, 32, 32, 3\)"):
        tiny_model.encode_image(np.zeros((1, 32, 32, 3)))
