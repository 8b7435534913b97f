"""radsam-jax: RadSAM (mask-prompted SAM, propagated through CT/MRI volumes) in JAX/Flax.

The public names load lazily, so importing the package (as every Grain worker does) stays cheap.
"""

import importlib

_EXPORTS = {
    "load_checkpoint": "radsam_jax.checkpoint",
    "save_model": "radsam_jax.checkpoint",
    "RadSam": "radsam_jax.model",
    "ModelConfig": "radsam_jax.model",
    "load_model_config": "radsam_jax.model",
    "Prompts": "radsam_jax.prompts",
    "VolumePredictor": "radsam_jax.inference",
    "Volume": "radsam_jax.io",
    "load_volume": "radsam_jax.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'radsam_jax' has no attribute {name!r}")
