"""The units a volume's intensities are windowed in (ModelConfig.intensity), in numpy only so the
data pipeline's worker processes can use it without importing JAX.

- "hu": CT Hounsfield units, as stored.
- "percentile": MRI, whose scale is arbitrary per scanner and sequence: each volume is rescaled
  linearly so that the PERCENTILES of its voxels above 0 become 0 and PERCENTILE_SCALE. The window
  (500, 1000) then clips to that percentile range and scales it to 0..255 with the background (0)
  black: MedSAM's MR normalisation.
"""

from typing import Optional

import numpy as np

INTENSITY_MODES = ("hu", "percentile")
PERCENTILES = (0.5, 99.5)
PERCENTILE_SCALE = 1000.0
# Soft-tissue abdominal CT window (level, width) in HU: the default of training and inference, and
# the window of converted SAM/MedSAM checkpoints and of model files written before `ct_window` existed.
DEFAULT_CT_WINDOW = (40.0, 400.0)
# The window of each mode when nothing sets one: for "percentile" exactly the percentile range.
DEFAULT_WINDOWS = {"hu": DEFAULT_CT_WINDOW, "percentile": (PERCENTILE_SCALE / 2, PERCENTILE_SCALE)}
# The modality of a volume nothing declares (a single `radsam evaluate --data IMAGE --labels` volume).
UNKNOWN_MODALITY = "unknown"


def window_unit(values, window) -> np.ndarray:
    """Intensities -> 0..1 float32 through a (level, width) window, clipped: the data pipeline's,
    previews' and reports' window (preprocess.window_ct is the model input's, on the device, x 255)."""
    level, width = window
    return np.clip((np.asarray(values, np.float32) - (level - width / 2.0)) / width, 0.0, 1.0)


def check_intensity(intensity: str) -> str:
    """`intensity` if it is one of INTENSITY_MODES, else a ValueError naming the value."""
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {', '.join(INTENSITY_MODES)}, got {intensity!r}")
    return intensity


def modality_mismatches(cases, intensity: str) -> tuple[list[str], list[str]]:
    """Among `cases` (anything with .case_id and .modality): "case (modality)" of those not CT, which
    "hu" cannot window, and the ids of the CT ones, which "percentile" would normalise (each list empty
    unless `intensity` is that mode). A modality of "unknown" (nothing declares it) is neither."""
    known = [c for c in cases if c.modality != UNKNOWN_MODALITY]
    not_ct = [f"{c.case_id} ({c.modality})" for c in known if c.modality.upper() != "CT"] if intensity == "hu" else []
    ct = [c.case_id for c in known if c.modality.upper() == "CT"] if intensity == "percentile" else []
    return not_ct, ct


def check_finite(array: np.ndarray, name: str) -> np.ndarray:
    """`array`, unless a voxel is NaN or infinite: a ValueError then names `name`, how many and the
    index of the first (io.load_volume checks files on their own grid, so the index is the file's)."""
    if np.issubdtype(array.dtype, np.inexact):
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
            raise ValueError(f"{name} holds {int(bad.sum())} NaN or infinite voxel(s), the first at voxel index {first}: "
                             f"replace them (e.g. with the background's value) first")
    return array


def volume_intensities(array, intensity: str, name: str = "the volume") -> np.ndarray:
    """A volume's values in the units its window is in: as stored for "hu"; for "percentile" rescaled
    so the PERCENTILES of its voxels above 0 become 0 and PERCENTILE_SCALE (float32). ValueError naming
    `name` when a voxel is NaN or infinite (it would spread through the encoder's attention and empty
    the mask of every slice that propagation reaches from there, silently), or a "percentile" volume
    has no voxel above 0 or its percentiles coincide."""
    check_intensity(intensity)
    array = check_finite(np.asarray(array), name)
    if intensity == "hu":
        return array
    array = np.asarray(array, np.float32)
    foreground = array[array > 0]  # MR background is 0: it would pull the low percentile to 0
    if foreground.size == 0:
        raise ValueError(f"{name} has no voxel above 0, so its intensities cannot be normalised by percentiles "
                         f"(intensity 'percentile' expects MR intensities >= 0 with a background of 0)")
    lo, hi = (float(v) for v in np.percentile(foreground, PERCENTILES))
    if not hi > lo:
        raise ValueError(f"{name}: the {PERCENTILES[0]:g}th and {PERCENTILES[1]:g}th percentiles of its voxels "
                         f"above 0 are both {lo:g}: nearly constant intensities cannot be normalised by percentiles")
    return (array - np.float32(lo)) * np.float32(PERCENTILE_SCALE / (hi - lo))


def not_hu_reason(array, name: str = "the volume") -> Optional[str]:
    """Why `array` does not look like CT in Hounsfield units (no value below 0, where CT has air near
    -1000: MRI or a rescaled CT read with intensity "hu"), or None."""
    if np.min(array) >= 0:
        return f"{name} has no value below 0, so it does not look like CT in Hounsfield units"
    return None


def window_caption(window, intensity: str) -> str:
    """'CT window 40/400 HU', or in "percentile" units 'window 500/1000 (p0.5-p99.5 = 0-1000)'."""
    text = f"window {window[0]:g}/{window[1]:g}"
    if intensity == "hu":
        return f"CT {text} HU"
    return f"{text} (p{PERCENTILES[0]:g}-p{PERCENTILES[1]:g} = 0-{PERCENTILE_SCALE:g})"
