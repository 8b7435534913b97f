"""Grain input pipeline: (case, structure, axial slice) samples -> model-ready batches with prompts.

Flow per sample (all numpy, in Grain worker processes; no JAX on the data path):
  canonical volume (RAS, from a per-worker LRU cache) -> axial slice k shown as array[:, :, k].T
  -> augment (affine on image + label, Gaussian noise) -> jittered window (the "HU clipping")
  (MRI, data.intensity "percentile": the cached volume is first rescaled by its own percentiles,
  radsam_jax.intensity.volume_intensities, and every intensity setting below is in those units)
  -> resize + normalise + pad to S x S exactly like radsam_jax.preprocess (numpy port, same weights)
  -> target = GT mask in the same S x S frame -> simulated prompt from a mixture
  -> fixed-shape fields (P point slots padded with label -1).

Determinism: the order of samples is a function of (seed, epoch) only, and each sample's random
draws come from np.random.default_rng([seed, shard_index, position]), so the same seed gives the
same batches whatever the number of workers or threads, and Grain's iterator state (get_state /
set_state) resumes exactly.

Order: with `shuffle`, each epoch permutes the cases, groups them in blocks of `cases_per_block`
and shuffles samples within a block, so a worker's volume cache (`cache_size` >= cases_per_block)
keeps hitting instead of decoding a new NIfTI per sample; cases_per_block = 0 shuffles globally.

Sharding: the sample set is split once (seeded) into `shard_count` disjoint subsets of equal size
(the remainder is dropped), one per JAX process by default, so every process yields the same
number of batches and no sample is seen by two processes in an epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

import grain
import ml_collections
import numpy as np

from radsam_jax.data import augment as augment_lib
from radsam_jax.data import datasets
from radsam_jax.data import prompt_simulation as ps
from radsam_jax.intensity import INTENSITY_MODES, modality_mismatches, not_hu_reason, volume_intensities, window_unit
from radsam_jax.io import write_atomically

log = logging.getLogger(__name__)

# Deviation from the paper: section 3.2 trains with three prompts (point, box, mask). The combined
# types are added because inference sends them: an edit decodes a slice from the current mask plus
# the stored clicks (mask_points); propagation re-sends the user's stored box together with the
# previous mask when the scan passes the box's slice (box_mask), and with the clicks too once that
# slice is edited, as the paper's box-prompt edit rows do on every slice (box_mask_points); see
# radsam_jax/inference/propagation.py. Set prompts.mixture to point/box/mask only for the paper's mix.
PROMPT_TYPES = ("point", "box", "mask", "mask_points", "box_mask", "box_mask_points")


def default_data_config() -> ml_collections.ConfigDict:
    """Every data field with its default; training configs copy this and override what they need."""
    c = ml_collections.ConfigDict()
    # --- dataset
    c.format = "generic"  # layout: "amos", "totalsegmentator" or "generic" (labels.json per case)
    c.root = ""  # dataset folder (for "generic": one case folder or a folder of case folders)
    c.val_root = ""  # folder read for split == val_split ('' = root); lets generic data train/val on separate folders
    c.train_split = "train"  # split name given to the reader when make_data_iterator(split="train")
    c.val_split = "val"  # split name for validation ("val" for AMOS imagesVa/labelsVa and TotalSegmentator meta.csv)
    c.modality = "CT"  # AMOS: "CT" (cases <= 500), "MRI" (> 500) or "all"; MRI needs intensity "percentile"
    c.structures = ()  # structure names to train on; empty = every structure of the dataset
    c.min_area = 10  # a (structure, slice) is a sample only if its mask has >= this many pixels on the original slice
    # --- intensity
    c.intensity = "hu"  # "hu": CT Hounsfield units; "percentile": MRI, each volume's p0.5..p99.5 (voxels > 0) -> 0..1000
    c.window_level = 40.0  # window centre in the intensity's units (CT: HU, soft tissue; percentile: 500)
    c.window_width = 400.0  # window width (CT: HU; percentile: 1000); values outside the window are clipped
    c.window_level_jitter = 20.0  # training: level += U(-j, j) (HU, or percentile units) per sample
    c.window_width_jitter = 0.2  # training: width *= U(1 - j, 1 + j) per sample
    # --- augmentation (training split only; see radsam_jax/data/augment.py)
    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True  # apply augmentations on the training split
    c.augment.probability = 0.8  # chance of the affine, and separately of the noise, per sample
    c.augment.rotation_deg = 15.0  # rotation in [-r, r] degrees about the slice centre
    c.augment.shear_deg = 5.0  # shear angle in [-s, s] degrees
    c.augment.zoom = 0.15  # zoom factor in [1 - z, 1 + z]
    c.augment.translation = 0.1  # shift in [-t, t] x slice width / height
    c.augment.noise_std_hu = 20.0  # Gaussian noise, std drawn in [0, n] HU (percentile units for MRI: 2% of p0.5..p99.5)
    c.augment.fill_hu = -1024.0  # value of pixels brought in from outside the slice (air in HU; below 0, black, for MRI)
    # --- prompts (see radsam_jax/data/prompt_simulation.py)
    c.prompts = ml_collections.ConfigDict()
    c.prompts.mixture = ml_collections.ConfigDict(
        dict(point=0.2, box=0.2, mask=0.15, mask_points=0.15, box_mask=0.15, box_mask_points=0.15)
    )  # probability of each prompt type per sample (normalised); mask_points = noisy mask + correction points,
    # box_mask = jittered box + noisy mask, box_mask_points = both: not in the paper (3 prompts), added as
    # inference sends them (see PROMPT_TYPES). A box or point alone is learned from the image, a mask is
    # easily copied: they keep the larger shares.
    c.prompts.num_points = 11  # P: point slots per sample (unused: label -1); correction prompts draw 1..P points.
    # 11: a slice-level prompt point + the paper's 10 edits on that slice, the most its protocol sends one slice
    c.prompts.max_positive_points = 1  # "point" prompts draw 1..this many positive points
    c.prompts.box_jitter = (-5.0, 20.0)  # per-side box jitter range in pixels at a 1024 input (scaled by S/1024)
    c.prompts.mask_rotation_deg = 5.0  # mask prompt noise: rotation in [-r, r] degrees about the object centroid
    c.prompts.mask_scale = 0.10  # mask prompt noise: scaling factor in [1 - s, 1 + s]
    c.prompts.mask_translation = 0.15  # mask prompt noise: shift in [-t, t] x the object's bounding-box width/height
    c.prompts.mask_erosion_steps = 5  # mask prompt noise: erosion steps drawn in 0..n (at the reference size)
    c.prompts.mask_dilation_steps = 5  # mask prompt noise: dilation steps drawn in 0..n (at the reference size)
    c.prompts.mask_structure = "cross"  # morphology element: "cross" (4-neighbour) or "square" (8-neighbour)
    c.prompts.mask_reference_size = 256  # mask side at which the step counts hold (scaled by mask_size / this)
    # --- loading
    c.num_workers = 0  # Grain worker processes (0 = in the main process)
    c.read_threads = 2  # threads per process reading samples (Grain ReadOptions.num_threads)
    c.prefetch_buffer_size = 4  # batches prefetched per process (ReadOptions.prefetch_buffer_size)
    c.worker_buffer_size = 1  # batches buffered per worker process
    c.cache_size = 4  # decoded canonical volumes kept per worker (LRU)
    c.shuffle = True  # shuffle samples each epoch (training)
    c.cases_per_block = 4  # shuffle within blocks of this many cases for cache locality; 0 = global shuffle
    c.index_cache_dir = ""  # folder to cache the (case, structure, slice) index as .npz; '' = build it at each start
    c.include_sample_ids = False  # add "sample_id" (B,) int64 to batches (debugging, tests)
    # --- validation (iterate_slices)
    c.val_max_samples = 256  # cap on validation slices, evenly spread over the index (0 = none); see eval.max_batches
    c.val_prompt = "box"  # validation prompt: "box" (tight, no jitter), "point" or "mask" (seeded noise)
    return c


# ------------------------------------------------------------------------- numpy preprocessing


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The model-input numbers the data path needs (kept apart from ModelConfig to stay picklable/light)."""

    image_size: int
    mask_size: int
    preprocessing: str
    pixel_mean: tuple
    pixel_std: tuple

    @classmethod
    def from_model_config(cls, config) -> "InputSpec":
        return cls(int(config.image_size), int(config.mask_size), str(config.preprocessing),
                   tuple(config.pixel_mean), tuple(config.pixel_std))

    def resized(self, h: int, w: int) -> tuple[int, int]:
        if self.preprocessing == "medsam":
            return self.image_size, self.image_size
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)


def _weight_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """(out, in) weights of jax.image.resize's "linear" kernel (jax/_src/image/scale.py)."""
    scale = out_size / in_size
    inv = 1.0 / scale
    kernel_scale = max(inv, 1.0) if antialias else 1.0
    sample = (np.arange(out_size, dtype=np.float64) + 0.5) * inv - 0.5
    x = np.abs(sample[None, :] - np.arange(in_size, dtype=np.float64)[:, None]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - x)
    total = weights.sum(axis=0, keepdims=True)
    weights = np.where(np.abs(total) > 1000.0 * np.finfo(np.float32).eps, weights / np.where(total != 0, total, 1), 0)
    weights = np.where(((sample >= -0.5) & (sample <= in_size - 0.5))[None, :], weights, 0)
    return weights.T.astype(np.float32)


_TAPS: dict = {}


def _taps(in_size: int, out_size: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """The banded weight matrix as (out, K) input indices and (out, K) weights (K = widest row)."""
    key = (in_size, out_size, antialias)
    if key not in _TAPS:
        w = _weight_matrix(in_size, out_size, antialias)
        k = max(1, int((w != 0).sum(axis=1).max()))
        first = np.where((w != 0).any(axis=1), (w != 0).argmax(axis=1), 0)
        first = np.minimum(first, max(0, in_size - k))
        idx = first[:, None] + np.arange(k)[None, :]
        idx = np.minimum(idx, in_size - 1)
        weights = np.take_along_axis(w, idx, axis=1)
        if len(_TAPS) > 64:
            _TAPS.clear()
        _TAPS[key] = (idx, weights.astype(np.float32))
    return _TAPS[key]


def _resize_axis0(x: np.ndarray, out_size: int, antialias: bool) -> np.ndarray:
    idx, weights = _taps(x.shape[0], out_size, antialias)
    out = np.zeros((out_size,) + x.shape[1:], np.float32)
    for k in range(idx.shape[1]):
        out += weights[:, k, None] * x[idx[:, k]]
    return out


def resize_linear(image: np.ndarray, out_hw: tuple[int, int], antialias: bool) -> np.ndarray:
    """(H, W) float -> (h, w) with the same weights as jax.image.resize(..., "linear", antialias),
    applied as a banded (sparse) separable filter."""
    x = _resize_axis0(np.asarray(image, np.float32), out_hw[0], antialias)
    return np.ascontiguousarray(_resize_axis0(np.ascontiguousarray(x.T), out_hw[1], antialias).T)


def preprocess_slice(hu: np.ndarray, spec: InputSpec, level: float, width: float) -> np.ndarray:
    """(H, W) HU -> (S, S, 3) float32 model input; numpy twin of preprocess.preprocess_ct_slices."""
    gray = window_unit(hu, (level, width)) * 255.0
    resized = resize_linear(gray, spec.resized(*gray.shape), antialias=True)
    if spec.preprocessing == "medsam":
        lo_, hi_ = resized.min(), resized.max()
        out = (resized - lo_) / max(hi_ - lo_, 1e-8)
        return np.repeat(out[..., None], 3, axis=-1).astype(np.float32)
    x = (resized[..., None] - np.asarray(spec.pixel_mean, np.float32)) / np.asarray(spec.pixel_std, np.float32)
    s = spec.image_size
    out = np.zeros((s, s, 3), np.float32)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def mask_to_input(mask: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W) binary mask -> (S, S) uint8 in the model-input frame (resized like the image, padded).

    Bilinear then > 0.5; if that erases a thin object, > 0 of the
    antialiased resize instead, so a sample whose original slice holds the object never gets an empty
    target (plain bilinear reads only the source pixels nearest each output pixel: shrinking a slice
    more than twice, it can miss a thin object altogether).
    """
    m = np.asarray(mask, np.float32)
    resized = resize_linear(m, spec.resized(*m.shape), antialias=False)
    binary = resized > 0.5
    if not binary.any() and m.any():
        binary = resize_linear(m, spec.resized(*m.shape), antialias=True) > 0.0
    s = spec.image_size
    out = np.zeros((s, s), np.uint8)
    out[: binary.shape[0], : binary.shape[1]] = binary
    return out


def mask_to_prompt_np(mask: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W) binary mask -> (S/4, S/4) bool mask prompt: bilinear to the resized size, pad,
    antialiased bilinear to S/4, > 0.5 (a ground-truth mask made a prompt as SAM's training makes
    its low-resolution masks), falling back to > 0 of
    antialiased resizes throughout when that erases a small object (as `mask_to_input`)."""
    m = np.asarray(mask, np.float32)

    def small(antialias_first: bool) -> np.ndarray:
        resized = resize_linear(m, spec.resized(*m.shape), antialias=antialias_first)
        s = spec.image_size
        padded = np.zeros((s, s), np.float32)
        padded[: resized.shape[0], : resized.shape[1]] = resized
        return resize_linear(padded, (spec.mask_size, spec.mask_size), antialias=True)

    binary = small(False) > 0.5
    if not binary.any() and m.any():
        binary = small(True) > 0.0
    return binary


# ------------------------------------------------------------------------------- prompt fields


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    mixture: tuple  # ((name, probability), ...) normalised
    num_points: int
    max_positive_points: int
    box_jitter: tuple  # in model-input pixels
    perturbation: ps.MaskPerturbation

    @classmethod
    def from_config(cls, data_config, spec: InputSpec) -> "PromptSettings":
        p = data_config.prompts
        mixture = {k: float(v) for k, v in dict(p.mixture).items() if float(v) > 0}
        unknown = sorted(set(mixture) - set(PROMPT_TYPES))
        if unknown:
            raise ValueError(f"unknown prompt type(s) {unknown} in prompts.mixture; known: {PROMPT_TYPES}")
        if not mixture:
            raise ValueError("prompts.mixture gives no prompt type a positive probability")
        total = sum(mixture.values())
        if int(p.num_points) < max(1, int(p.max_positive_points)):
            raise ValueError(f"prompts.num_points={p.num_points} < max_positive_points={p.max_positive_points}")
        scale = spec.image_size / 1024.0
        perturbation = ps.MaskPerturbation(
            rotation_deg=float(p.mask_rotation_deg), scale=float(p.mask_scale), translation=float(p.mask_translation),
            erosion_steps=int(p.mask_erosion_steps), dilation_steps=int(p.mask_dilation_steps),
            structure=str(p.mask_structure), steps_scale=spec.mask_size / float(p.mask_reference_size),
        )
        return cls(tuple((k, v / total) for k, v in sorted(mixture.items())), int(p.num_points),
                   int(p.max_positive_points), (float(p.box_jitter[0]) * scale, float(p.box_jitter[1]) * scale),
                   perturbation)


def simulate_prompt(target: np.ndarray, small_target: np.ndarray, prompt_type: str, settings: PromptSettings,
                    spec: InputSpec, rng: np.random.Generator) -> dict:
    """Prompt fields for one (S, S) target in model-input pixels, with P fixed point slots.

    small_target: the GT as a (S/4, S/4) mask prompt (mask_to_prompt_np), perturbed for mask prompts.
    """
    p = settings.num_points
    points = np.zeros((p, 2), np.float32)
    labels = -np.ones((p,), np.int32)
    box = np.zeros((4,), np.float32)
    has_box = False
    mask = np.zeros((spec.mask_size, spec.mask_size), np.float32)
    has_mask = False
    if prompt_type == "point":
        n = int(rng.integers(1, settings.max_positive_points + 1))
        for i in range(n):
            points[i] = ps.positive_point(target, rng)
            labels[i] = 1
    if prompt_type in ("box", "box_mask", "box_mask_points"):
        box, _ = ps.jittered_box(target, rng, settings.box_jitter)
        has_box = True
    if prompt_type in ("mask", "mask_points", "box_mask", "box_mask_points"):
        noisy, _ = ps.perturb_mask(small_target, rng, settings.perturbation)
        mask = noisy.astype(np.float32)
        has_mask = True
        if prompt_type in ("mask_points", "box_mask_points"):
            # The noisy mask plays the previous prediction; corrections go where it is wrong.
            factor = spec.image_size // spec.mask_size
            as_prediction = np.repeat(np.repeat(noisy, factor, axis=0), factor, axis=1)
            n = int(rng.integers(1, p + 1))
            pts, lab = ps.correction_points(as_prediction, target.astype(bool), rng, n)
            if len(lab) == 0:  # perfect noisy mask: fall back to one positive point
                pts, lab = ps.positive_point(target, rng)[None], np.ones((1,), np.int32)
            points[: len(lab)] = pts
            labels[: len(lab)] = lab
    return dict(points=points, point_labels=labels, box=box, has_box=np.bool_(has_box),
                mask=mask, has_mask=np.bool_(has_mask))


# ------------------------------------------------------------------------------ sample index


@dataclasses.dataclass
class SliceIndex:
    """Flat arrays, one entry per (case, structure, axial slice) sample; sorted by case then slice."""

    case: np.ndarray  # int32 index into `cases`
    label: np.ndarray  # int32 label id in the case's label map
    slice: np.ndarray  # int32 axial slice in the canonical (RAS) volume
    area: np.ndarray  # int64 mask pixels on that slice

    def __len__(self) -> int:
        return int(self.case.shape[0])


def _index_key(cases, min_area: int) -> str:
    items = []
    for c in cases:
        stats = [(str(f), st.st_size, st.st_mtime_ns) for f in datasets.case_files(c) for st in [f.stat()]]
        items.append((c.case_id, stats, sorted(c.structures.items())))
    return hashlib.sha1(json.dumps([items, min_area], default=str).encode()).hexdigest()[:16]


def build_slice_index(cases: Sequence[datasets.Case], min_area: int = 1, cache_dir: str = "") -> SliceIndex:
    """Loads every case once (canonical orientation) and lists the slices where each structure has
    at least `min_area` pixels. With `cache_dir`, the index is stored/reused as an .npz keyed by the
    case files (paths, sizes, mtimes), structures and min_area."""
    cache_file = None
    if cache_dir:
        cache_file = Path(cache_dir) / f"slice-index-{_index_key(cases, min_area)}.npz"
        if cache_file.exists():
            z = np.load(cache_file)
            return SliceIndex(z["case"], z["label"], z["slice"], z["area"])
    parts = []
    for ci, case in enumerate(cases):
        _, labels = datasets.load_case(case, canonical=True)
        ids = np.array(sorted(set(case.structures.values())), np.int64)
        top = int(max(ids.max(), labels.max())) + 1
        flat = labels.reshape(-1, labels.shape[2]).astype(np.int64)  # (X*Y, Z)
        counts = np.stack([np.bincount(flat[:, k], minlength=top) for k in range(flat.shape[1])], axis=0)
        sub = counts[:, ids]  # (Z, n_ids)
        ks, js = np.nonzero(sub >= max(1, int(min_area)))
        order = np.lexsort((js, ks))
        parts.append((np.full(order.size, ci, np.int32), ids[js[order]].astype(np.int32),
                      ks[order].astype(np.int32), sub[ks[order], js[order]].astype(np.int64)))
    if parts:
        index = SliceIndex(*(np.concatenate([p[i] for p in parts]) for i in range(4)))
    else:
        index = SliceIndex(*(np.zeros((0,), t) for t in (np.int32, np.int32, np.int32, np.int64)))
    if cache_file is not None:
        write_atomically(cache_file, lambda tmp: np.savez(tmp, case=index.case, label=index.label,
                                                          slice=index.slice, area=index.area), suffix=".npz")
    return index


# --------------------------------------------------------------------------------- loading


_NOT_HU_WARNED: set = set()  # image paths named once per process, not at every validation's new cache


class VolumeCache:
    """LRU of decoded canonical (intensity array, label map) per case, the array in the units of
    `intensity` (HU, or percentile-normalised MR); one per worker process, thread-safe.

    Pickling drops the contents (each spawned Grain worker starts empty)."""

    def __init__(self, cases: Sequence[datasets.Case], size: int, intensity: str = "hu"):
        self.cases = list(cases)
        self.size = max(1, int(size))
        self.intensity = intensity
        self._init()

    def _init(self):
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict = {}

    def __getstate__(self):
        return {"cases": self.cases, "size": self.size, "intensity": self.intensity}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init()

    def get(self, case_index: int):
        with self._lock:
            if case_index in self._data:
                self._data.move_to_end(case_index)
                return self._data[case_index]
            event = self._loading.get(case_index)
            owner = event is None
            if owner:
                event = self._loading[case_index] = threading.Event()
        if not owner:  # another thread is decoding this volume: wait for it
            event.wait()
            return self.get(case_index)
        try:
            case = self.cases[case_index]
            volume, labels = datasets.load_case(case, canonical=True)
            name = f"case {case.case_id} ({case.image_path})"
            value = (volume_intensities(volume.array, self.intensity, name), labels)
            doubt = not_hu_reason(volume.array, name) if self.intensity == "hu" else None
            if doubt and case.image_path not in _NOT_HU_WARNED:  # e.g. MR in a generic folder without "modality": "MR"
                _NOT_HU_WARNED.add(case.image_path)
                log.warning("%s, yet it is windowed in HU (intensity 'hu'); if it is MR, give its labels.json "
                            "\"modality\": \"MR\" and set %s (datasets.NAME.* in a mixture)", doubt, mr_settings())
            with self._lock:
                self._data[case_index] = value
                while len(self._data) > self.size:
                    self._data.popitem(last=False)
            return value
        finally:
            with self._lock:
                self._loading.pop(case_index, None)
            event.set()


def _get_slice(cache: VolumeCache, case_index: int, label: int, k: int):
    array, labels = cache.get(case_index)
    # Axial slice k shown as array[:, :, k].T: rows = y (second axis), columns = x (first axis).
    return np.ascontiguousarray(array[:, :, k].T), np.ascontiguousarray(labels[:, :, k].T == label)


class SampleTransform:
    """(position, sample id) -> one training/validation example dict (Grain map function)."""

    def __init__(self, cases, index: SliceIndex, spec: InputSpec, data_config, *, train: bool,
                 seed: int, shard_index: int, prompt_override: Optional[str] = None):
        self.cache = VolumeCache(cases, data_config.cache_size, data_config.get("intensity", "hu"))
        self.index = index
        self.spec = spec
        self.train = train
        self.seed = int(seed)
        self.shard_index = int(shard_index)
        self.prompts = PromptSettings.from_config(data_config, spec)
        if prompt_override is not None:
            if prompt_override not in PROMPT_TYPES:
                raise ValueError(f"prompt must be one of {PROMPT_TYPES}, got {prompt_override!r}")
            self.prompts = dataclasses.replace(self.prompts, mixture=((prompt_override, 1.0),),
                                               box_jitter=(0.0, 0.0), max_positive_points=1)
        a = data_config.augment
        self.augment = augment_lib.AugmentConfig(
            probability=float(a.probability), rotation_deg=float(a.rotation_deg), shear_deg=float(a.shear_deg),
            zoom=float(a.zoom), translation=float(a.translation), noise_std_hu=float(a.noise_std_hu),
            fill_hu=float(a.fill_hu))
        self.augment_enabled = bool(a.enabled) and train
        self.window = (float(data_config.window_level), float(data_config.window_width))
        self.window_jitter = (float(data_config.window_level_jitter), float(data_config.window_width_jitter))
        self.include_sample_ids = bool(data_config.include_sample_ids)

    def __call__(self, element):
        position, sample = element
        rng = np.random.default_rng([self.seed, self.shard_index, int(position)])
        ci, label, k = int(self.index.case[sample]), int(self.index.label[sample]), int(self.index.slice[sample])
        hu, mask = _get_slice(self.cache, ci, label, k)
        level, width = self.window
        if self.train:
            if self.augment_enabled:
                aug_hu, aug_mask, _ = augment_lib.augment_slice(hu, mask.astype(np.uint8), rng, self.augment)
                if aug_mask.any():  # an affine that pushes the object out of view is dropped
                    hu, mask = aug_hu, aug_mask.astype(bool)
            level, width = augment_lib.jitter_window(level, width, *self.window_jitter, rng)
        image = preprocess_slice(hu, self.spec, level, width)
        target = mask_to_input(mask, self.spec)
        names = [n for n, _ in self.prompts.mixture]
        probs = np.array([p for _, p in self.prompts.mixture])
        prompt_type = names[int(rng.choice(len(names), p=probs))] if len(names) > 1 else names[0]
        out = dict(image=image, target=target, **simulate_prompt(target, mask_to_prompt_np(mask, self.spec), prompt_type,
                                                                    self.prompts, self.spec, rng))
        if self.include_sample_ids:
            out["sample_id"] = np.int64(sample)
        return out


class EpochOrder:
    """Random-access sequence position -> (position, sample id) over `num_epochs` (None = forever).

    Each epoch's order is a pure function of (seed, epoch); see the module docstring for blocks."""

    def __init__(self, samples: np.ndarray, sample_case: np.ndarray, *, seed: int, num_epochs: Optional[int],
                 shuffle: bool, cases_per_block: int):
        self.samples = np.asarray(samples, np.int64)
        self.sample_case = np.asarray(sample_case, np.int64)
        self.seed = int(seed)
        self.num_epochs = num_epochs
        self.shuffle = bool(shuffle)
        self.cases_per_block = int(cases_per_block)
        self._cached: tuple = (-1, None)

    def __len__(self) -> int:
        n = len(self.samples)
        return sys.maxsize if (self.num_epochs is None and n) else n * int(self.num_epochs or 0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.samples)
        if not self.shuffle:
            return self.samples
        rng = np.random.default_rng([self.seed, 7919, int(epoch)])
        if self.cases_per_block <= 0:
            return self.samples[rng.permutation(n)]
        case_ids = np.unique(self.sample_case)
        case_ids = case_ids[rng.permutation(case_ids.size)]
        out = []
        for b in range(0, case_ids.size, self.cases_per_block):
            members = np.flatnonzero(np.isin(self.sample_case, case_ids[b: b + self.cases_per_block]))
            out.append(self.samples[members[rng.permutation(members.size)]])
        return np.concatenate(out)

    def __getitem__(self, position: int):
        if not 0 <= position < len(self):
            raise IndexError(position)
        epoch, j = divmod(int(position), len(self.samples))
        cached_epoch, order = self._cached
        if cached_epoch != epoch:
            order = self.epoch_order(epoch)
            self._cached = (epoch, order)
        return int(position), int(order[j])


def shard_samples(num_samples: int, shard_index: int, shard_count: int, seed: int) -> np.ndarray:
    """Disjoint equal-size subsets of range(num_samples): a seeded permutation, strided by shard."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside 0..{shard_count - 1}")
    perm = np.random.default_rng([int(seed), 104729]).permutation(num_samples)
    per_shard = num_samples // shard_count
    if per_shard == 0:
        raise ValueError(f"{num_samples} samples cannot be split over {shard_count} shards")
    return np.sort(perm[shard_index::shard_count][:per_shard])


# ----------------------------------------------------------------------------- public entries


def _split_name(data_config, split: str) -> tuple[str, str, str]:
    """(key of the root, root, reader split) for a pipeline split ("train", "val" or a reader split name)."""
    reader_split = {"train": data_config.train_split, "val": data_config.val_split}.get(split, split)
    key = "val_root" if (split in ("val", data_config.val_split) and data_config.val_root) else "root"
    return key, data_config[key], reader_split


def _structures(data_config) -> tuple:
    s = data_config.structures
    if isinstance(s, str):
        s = [x.strip() for x in s.split(",") if x.strip()]
    return tuple(s or ())


def mr_settings(name: str = "data") -> str:
    """What to set on the data config `name` to train on MR data (errors that refuse MR cases with "hu")."""
    return f'{name}.intensity="percentile", {name}.window_level=500, {name}.window_width=1000'


def check_modality(data_config, name: str = "data") -> None:
    """ValueError (naming the data config `name`) unless data_config.intensity is known and fits the
    modality: with "hu" every intensity step (window, its jitter, noise, fill) is in Hounsfield units,
    which MRI signal is not (arbitrary, scanner-dependent scale), so MR cases need "percentile" (the
    paper trains on AMOS CT)."""
    intensity = data_config.get("intensity", "hu")
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"{name}.intensity {intensity!r} is not one of {', '.join(INTENSITY_MODES)}")
    modality = str(data_config.modality).upper()
    if intensity == "hu" and data_config.format == "amos" and modality != "CT":
        instead = f"{name}.modality=\"MRI\" and " if modality == "ALL" else ""
        raise ValueError(f"{name}.modality {data_config.modality!r} with {name}.intensity 'hu': MRI cases (AMOS > 500) "
                         f"are not in Hounsfield units; set {instead}{mr_settings(name)}"
                         + (f", or {name}.modality=\"CT\"" if modality == "ALL" else ""))


def check_cache(data_config, name: str = "data") -> None:
    """ValueError unless a worker's volume cache holds a shuffle block's cases (cache_size >=
    cases_per_block): samples are shuffled within a block, so a smaller cache evicts volumes that
    the next samples need and decodes them again (about every other sample with 2 for 4)."""
    block, size = int(data_config.cases_per_block), int(data_config.cache_size)
    if data_config.shuffle and block > size:
        raise ValueError(f"{name}.cache_size {size} is below {name}.cases_per_block {block}: a worker's cache cannot "
                         f"hold the cases whose samples are shuffled together, so it decodes their volumes again "
                         f"and again; set {name}.cache_size >= {name}.cases_per_block")


def check_root(data_config, split: str, name: str = "data") -> None:
    """ValueError naming `name`.root (or `name`.val_root) and what was expected unless the folder that
    `split` reads looks like a dataset of data_config.format (datasets.layout_problem)."""
    if data_config.format not in datasets.FORMATS:
        raise ValueError(f"{name}.format {data_config.format!r} is not one of {', '.join(datasets.FORMATS)}")
    key, root, reader_split = _split_name(data_config, split)
    problem = datasets.layout_problem(data_config.format, root, reader_split)
    if problem:
        raise ValueError(f"{name}.{key}: {problem}")


def load_split(data_config, split: str) -> tuple[list, SliceIndex]:
    """Cases and slice index of a split (see build_slice_index); errors as `load_cases`, and if no
    sample is left."""
    cases = load_cases(data_config, split)
    _, root, _ = _split_name(data_config, split)
    index = build_slice_index(cases, int(data_config.min_area), data_config.index_cache_dir)
    if len(index) == 0:
        raise ValueError(f"no slice of split {split!r} under {root} holds a selected structure with >= "
                         f"{data_config.min_area} pixels")
    unsampled = _unsampled_structures(cases, index, _structures(data_config))
    if unsampled:  # named in a label table, but drawn in no slice: the run would leave them out unsaid
        log.warning("split %r under %s: no slice holds %s with >= %d pixels, so it is not trained or validated on",
                    split, root, ", ".join(unsampled), int(data_config.min_area))
    return cases, index


def _unsampled_structures(cases, index: SliceIndex, requested: Sequence[str]) -> list[str]:
    """The requested structure names no sample of `index` shows."""
    if not requested:
        return []
    sampled = set()
    for i, label in np.unique(np.stack([index.case, index.label], axis=1), axis=0).tolist():  # (case, label) pairs
        sampled.update(name for name, lid in cases[i].structures.items() if lid == label)
    return [name for name in requested if name not in sampled]


def load_cases(data_config, split: str) -> list:
    """The cases of a split with the selected structures, reading no volume; errors if the split's
    folder is not a dataset of data_config.format (see check_root) or, with intensity "hu", a case is
    not CT (see check_modality)."""
    check_root(data_config, split)
    _, root, reader_split = _split_name(data_config, split)
    cases = datasets.read_cases(data_config.format, root, reader_split, modality=data_config.modality,
                                structures=_structures(data_config))
    not_ct, ct = modality_mismatches(cases, data_config.get("intensity", "hu"))
    if not_ct:  # generic cases may declare a modality in labels.json
        raise ValueError(f"case(s) {', '.join(not_ct[:5])} under {root} are not CT (labels.json \"modality\"), "
                         f"so not in Hounsfield units (intensity 'hu'); set {mr_settings()}")
    if ct:
        log.warning("%d CT case(s) under %s (%s) are normalised by their percentiles (intensity 'percentile'), "
                    "which discards what Hounsfield units mean; CT is windowed in HU (intensity 'hu')",
                    len(ct), root, ", ".join(ct[:5]))
    return cases


def _ensure_absl_flags_parsed():
    """Grain's worker processes read absl flags; outside an absl app (pytest, notebooks) they are
    unparsed and Grain raises UnparsedFlagAccessError, so mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_ignores_ctrl_c(worker_index: int, worker_count: int) -> None:
    """Grain worker start-up: a terminal's Ctrl-C reaches the whole process group, and a worker that
    died of it broke the iterator, so training could not save the step it stops at. The main process
    alone answers Ctrl-C (train.checkpointing.PreemptionGuard) and ends the workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_data_iterator(data_config, model_config, *, split: str, batch_size: int, seed: int,
                       shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                       num_epochs: Optional[int] = None):
    """A Grain iterator of batches (dicts of numpy arrays) for this process's shard.

    Keys: image (B, S, S, 3) float32; target (B, S, S) uint8; points (B, P, 2) float32;
    point_labels (B, P) int32; box (B, 4) float32; has_box (B,) bool; mask (B, S/4, S/4) float32;
    has_mask (B,) bool (+ sample_id (B,) int64 with include_sample_ids). `batch_size` is per process;
    incomplete final batches are dropped. Augmentation and window jitter apply to split "train" only.
    The iterator has get_state() / set_state(state) (Grain's) for exact resumption; the state's
    structure depends on num_workers (0 vs > 0), so resume with the same setting.

    num_workers > 0 spawns processes (Grain uses "spawn"): the calling script needs the
    `if __name__ == "__main__":` guard (absl's app.run provides it), and each worker pays the import
    of radsam_jax (a few seconds) once. absl flags are marked parsed if nobody parsed them.
    Shards default to (jax.process_index(), jax.process_count()).
    """
    if shard_index is None or shard_count is None:
        import jax  # only for the process topology

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    cases, index = load_split(data_config, split)
    spec = InputSpec.from_model_config(model_config)
    own = shard_samples(len(index), int(shard_index), int(shard_count), seed)
    train = split == "train"
    order = EpochOrder(own, index.case[own], seed=seed, num_epochs=num_epochs,
                       shuffle=bool(data_config.shuffle) and train, cases_per_block=int(data_config.cases_per_block))
    transform = SampleTransform(cases, index, spec, data_config, train=train, seed=seed, shard_index=int(shard_index))
    ds = grain.MapDataset.source(order).map(transform).batch(int(batch_size), drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data_config.read_threads),
                                                 prefetch_buffer_size=int(data_config.prefetch_buffer_size)))
    if int(data_config.num_workers) > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_config.num_workers),
                                                               per_worker_buffer_size=int(data_config.worker_buffer_size)),
                                  worker_init_fn=_worker_ignores_ctrl_c)
    return iter(it_ds)


def iterate_slices(data_config, model_config, *, split: str = "val", batch_size: int,
                   max_samples: Optional[int] = None, prompt: Optional[str] = None,
                   seed: int = 0, loaded: Optional[tuple] = None) -> Iterator[dict]:
    """Deterministic held-out batches for periodic validation (in-process, no augmentation).

    Samples: the split's (case, structure, slice) index, evenly thinned to `max_samples`
    (default data_config.val_max_samples; 0 = all), in case order so each volume loads once.
    Prompt: `prompt` or data_config.val_prompt, "box" = tight box (no jitter); draws are seeded per
    sample. Same keys as make_data_iterator plus "valid" (B,) bool: the last batch is padded by
    repeating its last sample with valid=False, so shapes stay static. `loaded`: the split's
    load_split(data_config, split), kept by a caller that validates again and again (building the
    index reads every volume).
    """
    cases, index = loaded if loaded is not None else load_split(data_config, split)
    spec = InputSpec.from_model_config(model_config)
    limit = data_config.val_max_samples if max_samples is None else max_samples
    chosen = np.arange(len(index))
    if limit and len(index) > limit:
        chosen = np.unique(np.linspace(0, len(index) - 1, int(limit)).round().astype(np.int64))
    config = ml_collections.ConfigDict(data_config.to_dict())
    config.cache_size = 1  # sorted by case: one volume at a time
    transform = SampleTransform(cases, index, spec, config, train=False, seed=seed, shard_index=0,
                                prompt_override=prompt or data_config.val_prompt)
    for start in range(0, len(chosen), int(batch_size)):
        ids = list(chosen[start: start + batch_size])
        valid = [True] * len(ids) + [False] * (batch_size - len(ids))
        ids += [ids[-1]] * (batch_size - len(ids))
        items = [transform((int(s), int(s))) for s in ids]
        batch = {k: np.stack([it[k] for it in items]) for k in items[0]}
        batch["valid"] = np.array(valid, bool)
        yield batch
