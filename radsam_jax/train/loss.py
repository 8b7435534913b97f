"""RadSAM's training loss.

    total = w_primary   * [Dice + BCE](primary mask, target)
          + w_secondary * min_k [Dice + BCE](secondary mask k, target)     (per sample, k = 1..3)
          + w_iou       * mean_k (iou_pred_k - IoU(mask_k > 0, target))^2  (k = 0..3)

Choices (the paper only says "soft Dice + binary cross-entropy, 1 primary + 3 secondary masks"):
- **Resolution.** The decoder predicts logits at S/4 (256 for ViT-B); the target comes at the model
  input's S x S. We upsample the logits bilinearly x4 (`jax.image.resize`, half-pixel centres, i.e.
  torch's `align_corners=False`) to S x S rather than downsample the target, because (a) that is
  exactly how predictions are turned into masks at inference (`preprocess.upscale_logits`), so the loss
  scores what the user sees; (b) downsampling a binary target makes a fractional or aliased target
  and loses thin structures (vessels, small organs at 3 mm); (c) the cost is negligible next to the
  ViT encoder (4 x S^2 elementwise ops per sample).
- **Soft Dice** is the paper's reference [11], V-Net (Milletari et al. 2016): 2 sum(p g) / (sum(p^2) +
  sum(g^2)) on sigmoid probabilities p, summed over the image, with a smoothing constant of 1 so an
  empty target with an empty prediction scores 0 loss instead of 0/0. `dice="linear"` takes
  sum(p) + sum(g) instead (the form many libraries default to; the bundled small model's recipe).
- **BCE** is the mean over pixels of `sigmoid_binary_cross_entropy` on logits (numerically stable).
- **Secondary masks** are trained the SAM way: only the best of the 3 (lowest Dice + BCE per
  sample) gets the gradient, so they are free to specialise (whole / part / sub-part).
- **IoU head** regresses, with MSE, the real IoU of each binarised predicted mask (logits > 0 at
  S x S) with the target; the IoU target is a constant (stop_gradient).
- All loss arithmetic is float32, whatever the compute dtype of the model.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# Smoothing of the soft Dice: avoids 0/0 on empty target + empty prediction.
DICE_SMOOTH = 1.0


# Soft Dice denominators: V-Net's squared sums (the paper's citation) or plain sums.
DICE_FORMS = ("squared", "linear")


class LossSettings(NamedTuple):
    primary: float = 1.0  # weight of Dice + BCE on the primary mask
    secondary: float = 1.0  # weight of the best secondary mask's Dice + BCE
    iou: float = 1.0  # weight of the IoU-prediction MSE
    dice: str = "squared"  # soft Dice denominator, one of DICE_FORMS


def upsample_logits(mask_logits: jax.Array, size: int) -> jax.Array:
    """(B, K, s, s) low-res logits -> (B, K, size, size), bilinear, float32."""
    b, k = mask_logits.shape[:2]
    return jax.image.resize(mask_logits.astype(jnp.float32), (b, k, size, size), method="bilinear")


def soft_dice_loss(logits: jax.Array, target: jax.Array, form: str = "squared") -> jax.Array:
    """(..., H, W) logits and {0,1} target -> (...) 1 - soft Dice; `form` one of DICE_FORMS."""
    if form not in DICE_FORMS:
        raise ValueError(f"unknown soft Dice form {form!r}; choose one of {', '.join(DICE_FORMS)}")
    p = jax.nn.sigmoid(logits)
    inter = jnp.sum(p * target, axis=(-2, -1))
    if form == "squared":  # target is {0, 1}: sum(g^2) = sum(g)
        denom = jnp.sum(p * p, axis=(-2, -1)) + jnp.sum(target, axis=(-2, -1))
    else:
        denom = jnp.sum(p, axis=(-2, -1)) + jnp.sum(target, axis=(-2, -1))
    return 1.0 - (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)


def bce_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
    """(..., H, W) -> (...) mean binary cross-entropy over pixels."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target), axis=(-2, -1))


def binary_iou(logits: jax.Array, target: jax.Array) -> jax.Array:
    """(..., H, W) -> (...) IoU of (logits > 0) with the target; 1 when both are empty."""
    pred = (logits > 0).astype(jnp.float32)
    inter = jnp.sum(pred * target, axis=(-2, -1))
    union = jnp.sum(jnp.maximum(pred, target), axis=(-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def binary_dice(logits: jax.Array, target: jax.Array) -> jax.Array:
    """(..., H, W) -> (...) hard Dice of (logits > 0) with the target; 1 when both are empty."""
    pred = (logits > 0).astype(jnp.float32)
    inter = jnp.sum(pred * target, axis=(-2, -1))
    denom = jnp.sum(pred, axis=(-2, -1)) + jnp.sum(target, axis=(-2, -1))
    return jnp.where(denom > 0, 2.0 * inter / jnp.maximum(denom, 1.0), 1.0)


def radsam_loss_per_sample(
    mask_logits: jax.Array,
    iou_pred: jax.Array,
    target: jax.Array,
    settings: LossSettings = LossSettings(),
) -> dict:
    """Per-sample loss terms and metrics, each (B,).

    mask_logits: (B, 4, S/4, S/4), index 0 primary, 1..3 secondary. iou_pred: (B, 4).
    target: (B, S, S), any dtype, nonzero = object.
    Returns {"loss", "loss_primary", "loss_secondary", "loss_iou", "dice", "iou"}; dice / iou are
    hard scores of the primary mask at S x S.
    """
    size = target.shape[-1]
    t = (target > 0).astype(jnp.float32)[:, None]  # (B, 1, S, S)
    logits = upsample_logits(mask_logits, size)  # (B, 4, S, S)
    seg = soft_dice_loss(logits, t, settings.dice) + bce_loss(logits, t)  # (B, 4)
    primary = seg[:, 0]
    secondary = jnp.min(seg[:, 1:], axis=1)
    real_iou = jax.lax.stop_gradient(binary_iou(logits, t))  # (B, 4)
    iou_mse = jnp.mean(jnp.square(iou_pred.astype(jnp.float32) - real_iou), axis=1)
    total = settings.primary * primary + settings.secondary * secondary + settings.iou * iou_mse
    return {
        "loss": total,
        "loss_primary": primary,
        "loss_secondary": secondary,
        "loss_iou": iou_mse,
        "dice": binary_dice(logits[:, 0], t[:, 0]),
        "iou": real_iou[:, 0],
    }


def radsam_loss(
    mask_logits: jax.Array,
    iou_pred: jax.Array,
    target: jax.Array,
    settings: LossSettings = LossSettings(),
) -> tuple[jax.Array, dict]:
    """Mean loss over the batch and the batch means of `radsam_loss_per_sample`'s terms."""
    terms = radsam_loss_per_sample(mask_logits, iou_pred, target, settings)
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    return metrics["loss"], metrics
