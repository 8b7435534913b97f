"""Volume inference: cached slice embeddings, jitted slice-by-slice propagation, edits, CLI."""

from radsam_jax.inference.orientation import SliceFrame
from radsam_jax.inference.propagation import EMPTY_LOGIT, PROPAGATION_MODES, VANISH_POLICIES, propagate_volume
from radsam_jax.inference.volume_predictor import VolumePredictor, VolumeResult, bucket_size

__all__ = [
    "EMPTY_LOGIT", "PROPAGATION_MODES", "SliceFrame", "VANISH_POLICIES", "VolumePredictor", "VolumeResult",
    "bucket_size", "propagate_volume",
]
