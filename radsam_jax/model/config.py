"""The model architecture as a frozen dataclass, built from the ml_collections files in configs/."""

import dataclasses
import math
from typing import Any, Mapping, Optional

from radsam_jax.intensity import DEFAULT_CT_WINDOW, check_intensity

# How a mask prompt reaches the mask encoder: RadSAM trains on binary 0/1 masks; SAM was trained on
# its own previous low-resolution logits (SAM, MedSAM and Hugging Face SamModel conversions).
MASK_PROMPT_ENCODINGS = ("binary", "logits")
# Input pipelines: "sam" (resize longest side, ImageNet mean/std, pad) and "medsam" (square, [0, 1]).
PREPROCESSING_MODES = ("sam", "medsam")


def is_valid_ct_window(window) -> bool:
    """Whether `window` is an intensity window (level, width): two finite numbers, width > 0."""
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        return False
    return math.isfinite(level) and math.isfinite(width) and width > 0


def _type_problem(value, default) -> Optional[str]:
    """What `value` should be, as the field's default is, or None when it is that."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if number(value) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(number(v) for v in value)
        return None if ok else "a list of numbers"
    return None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architecture number of a SAM-family model; see configs/vit_b.py for what each means."""

    name: str = "vit_b"
    image_size: int = 1024
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    # "sam": resize longest side + ImageNet mean/std + pad; "medsam": resize to square, min-max to [0, 1].
    preprocessing: str = "sam"
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # Intensity window (level, width) that turns a slice into the image the model was trained on, in
    # the units of `intensity` (HU for CT): preprocessing, not architecture. Set from
    # data.window_level / data.window_width by training.
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    # One of INTENSITY_MODES: how a volume's values become the units ct_window is in ("hu" for CT,
    # "percentile" for MRI). Set from data.intensity by training.
    intensity: str = "hu"
    # One of MASK_PROMPT_ENCODINGS: "binary" for models trained here, "logits" for SAM-family conversions.
    mask_prompt: str = "binary"

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mask_size(self) -> int:
        """Side of the low-resolution mask logits and of the mask prompt."""
        return 4 * self.embedding_size

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        values = dict(values)
        for f in dataclasses.fields(cls):  # the type of each default: a hand-edited "2" is not 2
            if f.name in values and (problem := _type_problem(values[f.name], f.default)):
                raise ValueError(f"{f.name} must be {problem}, got {values[f.name]!r}")
        for key in ("global_attn_indexes", "pixel_mean", "pixel_std"):
            if key in values:
                values[key] = tuple(values[key])
        if "ct_window" in values:  # absent from files written before it existed: the default
            try:
                values["ct_window"] = tuple(float(v) for v in values["ct_window"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"ct_window must be [level, width], got {values['ct_window']!r}") from e
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        small = [f"{k} {getattr(self, k)}" for k in ("image_size", "patch_size", "encoder_dim", "encoder_depth",
                                                      "encoder_heads", "prompt_embed_dim", "decoder_heads")
                 if getattr(self, k) < 1]
        if small:
            raise ValueError(f"{', '.join(small)}: must be >= 1")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.encoder_dim % self.encoder_heads:
            raise ValueError(f"encoder_dim {self.encoder_dim} is not divisible by encoder_heads {self.encoder_heads}")
        for width in (self.prompt_embed_dim, self.prompt_embed_dim // 2):  # decoder self- and cross-attention
            if width % self.decoder_heads:
                raise ValueError(f"decoder_heads {self.decoder_heads} does not divide the mask decoder's attention widths "
                                 f"{self.prompt_embed_dim} and {self.prompt_embed_dim // 2}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside 0..{self.encoder_depth - 1}")
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be 'sam' or 'medsam', got {self.preprocessing!r}")
        if not is_valid_ct_window(self.ct_window):
            raise ValueError(f"ct_window must be (level, width) with width > 0, got {self.ct_window!r}")
        check_intensity(self.intensity)
        if self.mask_prompt not in MASK_PROMPT_ENCODINGS:
            raise ValueError(f"mask_prompt must be one of {', '.join(MASK_PROMPT_ENCODINGS)}, got {self.mask_prompt!r}")


def load_model_config(name: str) -> ModelConfig:
    """The preset `configs/<name>.py` (vit_b, vit_l, vit_h, small) as a ModelConfig."""
    import importlib

    try:
        module = importlib.import_module(f"radsam_jax.configs.{name}")
    except ModuleNotFoundError as e:
        if e.name == "radsam_jax.configs":
            raise ModuleNotFoundError("radsam_jax.configs is the folder configs/ only once radsam-jax is installed "
                                      "(pip install -e .)", name=e.name) from e
        if e.name != f"radsam_jax.configs.{name}":  # a package the preset imports
            raise
        raise ValueError(f"no model config named {name!r} (configs/{name}.py)") from e
    return ModelConfig.from_mapping(module.get_config().to_dict())
