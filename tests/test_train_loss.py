"""Loss, loss scale and optimiser pieces of radsam_jax.train (in-process, no model compile)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from radsam_jax.train import optimizer as optimizer_lib
from radsam_jax.train.config_lib import base_config
from radsam_jax.train.loss import LossSettings, radsam_loss, radsam_loss_per_sample, soft_dice_loss, upsample_logits
from radsam_jax.train.state import DynamicLossScale


def _target(b=2, s=32):
    t = np.zeros((b, s, s), np.uint8)
    t[:, 8:20, 12:24] = 1  # aligned to the 4-pixel blocks of the low-res logits
    return jnp.asarray(t)


def _logits_from(target, k=4, value=30.0):
    """Low-res (S/4) logits from a block-aligned target (bilinear upsampling rounds its corners)."""
    low = np.asarray(target)[:, ::4, ::4].astype(np.float32) * 2 - 1
    return jnp.asarray(np.repeat(low[:, None], k, axis=1) * value)


def _exact(logits):
    """The S x S target that the upsampled logits predict exactly."""
    return (upsample_logits(logits, 4 * logits.shape[-1])[:, 0] > 0).astype(jnp.uint8)


def test_upsampling_shape_and_perfect_prediction():
    logits = _logits_from(_target())
    t = _exact(logits)
    assert upsample_logits(logits, 32).shape == (2, 4, 32, 32)
    terms = radsam_loss_per_sample(logits, jnp.ones((2, 4)), t)
    assert np.all(np.asarray(terms["dice"]) == 1.0)
    assert np.all(np.asarray(terms["iou"]) == 1.0)
    assert np.all(np.asarray(terms["loss_iou"]) < 1e-6)  # predicted IoU 1 = real IoU 1
    assert np.all(np.asarray(terms["loss_primary"]) < 0.01)


def test_secondary_is_min_over_masks_and_weights_apply():
    good = _logits_from(_target(1))
    t = _exact(good)
    bad = -good
    logits = jnp.concatenate([bad[:, :1], bad[:, 1:2], good[:, 2:3], bad[:, 3:4]], axis=1)
    terms = radsam_loss_per_sample(logits, jnp.zeros((1, 4)), t)
    assert float(terms["loss_secondary"][0]) < 0.01  # mask 2 is perfect
    assert float(terms["loss_primary"][0]) > 1.0  # primary is the inverse of the target
    loss, _ = radsam_loss(logits, jnp.zeros((1, 4)), t, LossSettings(1.0, 0.0, 0.0))
    assert float(loss) == pytest.approx(float(terms["loss_primary"][0]))


def test_iou_regression_target_is_the_real_iou():
    logits = _logits_from(_target(1))
    t = _exact(logits)
    grads = jax.grad(lambda iou: radsam_loss(logits, iou, t, LossSettings(0.0, 0.0, 1.0))[0])(jnp.zeros((1, 4)))
    # d/dp mean_k (p_k - 1)^2 = 2 (p_k - 1) / 4 = -0.5 at p = 0, real IoU = 1.
    np.testing.assert_allclose(np.asarray(grads), -0.5, rtol=1e-6)


def test_soft_dice_forms_against_their_formulas():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (3, 16, 16)).astype(np.float32)
    target = (rng.random((3, 16, 16)) < 0.3).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    inter = (p * target).sum(axis=(1, 2))
    squared = 1 - (2 * inter + 1) / ((p * p).sum(axis=(1, 2)) + (target * target).sum(axis=(1, 2)) + 1)  # V-Net
    linear = 1 - (2 * inter + 1) / (p.sum(axis=(1, 2)) + target.sum(axis=(1, 2)) + 1)
    np.testing.assert_allclose(np.asarray(soft_dice_loss(logits, target)), squared, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(soft_dice_loss(logits, target, "linear")), linear, rtol=1e-5)
    assert np.all(np.abs(squared - linear) > 1e-3)  # the forms differ on soft predictions
    with pytest.raises(ValueError, match="unknown soft Dice form 'cubic'"):
        soft_dice_loss(logits, target, "cubic")
    terms = radsam_loss_per_sample(jnp.asarray(logits[:1, None].repeat(4, 1)[..., ::4, ::4]), jnp.zeros((1, 4)),
                                   jnp.asarray(target[:1]), LossSettings(dice="linear"))
    default = radsam_loss_per_sample(jnp.asarray(logits[:1, None].repeat(4, 1)[..., ::4, ::4]), jnp.zeros((1, 4)),
                                     jnp.asarray(target[:1]))
    assert float(terms["loss_primary"][0]) != pytest.approx(float(default["loss_primary"][0]))


def test_dynamic_loss_scale():
    s = DynamicLossScale.create(8.0, period=2)
    s = s.update(jnp.asarray(True))
    assert float(s.scale) == 8.0 and int(s.good_steps) == 1
    s = s.update(jnp.asarray(True))
    assert float(s.scale) == 16.0 and int(s.good_steps) == 0
    s = s.update(jnp.asarray(False))
    assert float(s.scale) == 8.0 and int(s.good_steps) == 0
    tiny = DynamicLossScale.create(1.0).update(jnp.asarray(False))
    assert float(tiny.scale) == 1.0  # never below 1


def test_frozen_regex_parameters_do_not_move():
    params = {"image_encoder": {"w": jnp.ones(3)}, "mask_decoder": {"w": jnp.ones(3)}}
    c = base_config().optim
    c.learning_rate = 0.1
    c.frozen = ("image_encoder/.*",)
    tx = optimizer_lib.make_optimizer(c, params, 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["image_encoder"]["w"], 1.0)
    assert np.all(np.asarray(new["mask_decoder"]["w"]) < 1.0)


def test_trainable_regex_matching_nothing_is_an_error():
    c = base_config().optim
    c.trainable = ("imge_encoder/.*",)
    with pytest.raises(ValueError, match="select no parameter"):
        optimizer_lib.make_optimizer(c, {"image_encoder": {"w": jnp.ones(3)}}, 10)


def test_warmup_cosine_schedule():
    c = base_config().optim
    c.learning_rate, c.schedule, c.warmup_steps, c.min_lr = 1e-3, "cosine", 10, 0.0
    sched = optimizer_lib.make_schedule(c, 110)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(110)) == pytest.approx(0.0, abs=1e-9)


def test_logged_lr_is_the_rate_applied_when_float16_skips_steps():
    """A step skipped for float16 overflow advances state.step but not the optimiser's count, which
    the schedule follows: the logged lr is the one Adam applied."""
    from radsam_jax.train import loop, optimizer as opt, train_step as ts
    from radsam_jax.train.synthetic import make_synthetic_iterator
    from train_testlib import tiny_config

    c = tiny_config(precision="float16", num_train_steps=20)
    c.loss_scale.initial = 2.0 ** 24  # overflows: the first steps are skipped while the scale halves
    c.optim.warmup_steps, c.optim.schedule = 10, "cosine"
    mc, _ = loop.load_model(c)
    mesh = ts.make_mesh(1)
    params = jax.eval_shape(lambda: ts.init_variables(mc, jax.random.PRNGKey(0))["params"])
    tx, schedule = opt.make_optimizer(c.optim, params, 20), opt.make_schedule(c.optim, 20)
    it = make_synthetic_iterator(mc, split="train", batch_size=4, seed=0)
    applied, finite = [], []
    with jax.set_mesh(mesh):
        state = ts.create_sharded_state(mc, c, tx, mesh)
        step = ts.make_train_step(mc, c, tx, mesh, schedule)
        for _ in range(12):
            state, m = step(state, ts.to_global_batch(next(it), mesh))
            applied.append(float(m["lr"]))
            finite.append(bool(m["finite"]))
    assert 0 < sum(finite) < 12, finite  # some steps skipped, some applied
    expected = [float(schedule(sum(finite[:i]))) for i in range(12)]
    np.testing.assert_allclose(applied, expected, rtol=1e-6)
