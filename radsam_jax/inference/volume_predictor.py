"""`VolumePredictor`: volume-level (and slice-level) RadSAM inference on one CT volume at a time.

    predictor = VolumePredictor(load_checkpoint(path))
    volume = load_volume("ct.nii.gz")
    predictor.set_volume(volume)
    result = predictor.segment(60, box=(30, 40, 70, 80), bounds=(45, 75))   # voxel coordinates
    result = predictor.edit(52, points=[(50, 61)], point_labels=[0])        # correction + re-propagation
    save_label_map("mask.nii.gz", result.mask, like=volume)

    result = predictor.segment_slices({40: {"box": (30, 40, 70, 80)}, 41: {...}}, all_masks=True)
    result = predictor.edit_slices({40: ([(50, 61)], [0]), 41: ([(52, 60)], [1])})  # one batched decode

Coordinates are the file's voxel indices: slice = along its S/I axis, x and y = along its other two
axes in array order (for the usual axial file x = first array axis, y = second, slice = third, the
slice shown being `array[:, :, k].T`; a sagittal or coronal file works the same way, see
`orientation.SliceFrame`). Internally the volume is reoriented to canonical R, A, S, which is how
the model was trained; results come back on the file's own grid. Slice counts are padded to buckets
(`bucket`, default multiples of 32), so every compiled function (preprocessing, propagation,
upscaling) is reused by the next volume of the same in-plane size, and the propagation depends only
on the bucket; the encoder is compiled once for volumes of every size.

The encoder runs once per slice, lazily: `segment` encodes the slices inside its bounds that are not
yet cached, in chunks of `encoder_batch_size`; `edit` never re-runs it. The encoder uses the model's
global-attention implementation (`RadSam(..., attention=...)`).

Prompts remembered per object (re-sent whenever their slice is decoded again):
- correction points of every `edit` / `edit_slices`, on their slice;
- the box prompt of `segment` (on its slice) and of `segment_slices` (on each slice given one).
  Volume-level: an edit on the box's slice decodes it with the box + stored points + current mask
  (propagation="box": the stored box instead of the box around the current mask), and a
  re-propagation from another slice that passes the box's slice adds the box to the propagated
  prompt there (with vanish_policy="stop", a stored box also restarts a vanished propagation, as a
  positive point does). Slice-level: `edit_slices` sends each slice's box with its points and mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from radsam_jax.inference.orientation import SliceFrame
from radsam_jax.inference.propagation import (
    EMPTY_LOGIT, PROPAGATION_MODES, VANISH_POLICIES, decode_slices, propagate_volume, redecode_slices, sam_decoder,
    single_prompt, start_prompt,
)
from radsam_jax.intensity import DEFAULT_WINDOWS, check_intensity, not_hu_reason, volume_intensities
from radsam_jax.model.config import ModelConfig, is_valid_ct_window
from radsam_jax.model.sam import RadSam, check_compute_dtype, encode_images
from radsam_jax.preprocess import (
    Geometry, box_to_input, geometry, logits_to_mask, points_to_input, preprocess_ct_slices,
)
from radsam_jax.prompts import Prompts

Bucket = Union[int, Sequence[int]]
# Point slots per prompt and stored points per slice (the prompt's plus every edit's) by default;
# `prompt_file` checks a prompts file against it before anything runs.
DEFAULT_MAX_POINTS = 16


def default_encoder_batch_size(backend: Optional[str] = None) -> int:
    """Slices per encoder call when none is given: 1 on CPUs, 8 on accelerators.

    On the 2-core CPU of benchmarks/results/cpu_vs_torch.md the ViT-B encoder takes the same time
    per slice at batch 1, 2, 4 and 8 (11.5-12.1 s) while its temporaries grow from 0.3 to 2.5 GiB,
    and a short last chunk is padded with repeats of its last slice (up to 7 wasted encodes at 8).
    On an H100 (bfloat16) batch 8 runs 240 slices/s against 172 at batch 1.
    """
    return 1 if (backend or jax.default_backend()) == "cpu" else 8


def bucket_size(n: int, bucket: Bucket) -> int:
    """Padded size for n slices: the next multiple of `bucket` (int), or the smallest listed size
    >= n (sequence; beyond the largest, the next multiple of the largest)."""
    if n < 1:
        raise ValueError(f"need at least one slice, got {n}")
    listed = isinstance(bucket, Sequence) and not isinstance(bucket, str)
    if not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in (bucket if listed else [bucket])):
        raise TypeError(f"bucket must be an int or a sequence of ints (slice counts), got {bucket!r}")
    if isinstance(bucket, (int, np.integer)):
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        return int(math.ceil(n / bucket) * bucket)
    sizes = sorted(int(b) for b in bucket)
    if not sizes or sizes[0] < 1:
        raise ValueError(f"bucket sizes must be positive, got {bucket!r}")
    for s in sizes:
        if s >= n:
            return s
    return int(math.ceil(n / sizes[-1]) * sizes[-1])


@functools.partial(jax.jit, static_argnames=("config", "window"))
def _preprocess_chunk(hu_slices, indices, *, config: ModelConfig, window):
    """hu_slices[indices] (B,) -> (B, S, S, 3) model input: a small program, compiled per volume shape."""
    return preprocess_ct_slices(hu_slices[indices], config, window)


@functools.partial(jax.jit, donate_argnums=(0,))
def _store_embeddings(embeddings, emb, indices):
    return embeddings.at[indices].set(emb.astype(embeddings.dtype))


def _encode_into(variables, embeddings, hu_slices, indices, *, config: ModelConfig, dtype, window,
                 attention: str = "chunked"):
    """Preprocesses and encodes hu_slices[indices] (B,) and writes them into embeddings (donated);
    `attention` is the encoder's global-attention implementation (`RadSam.attention`).

    Three programs, so that only the cheap ones depend on the volume's in-plane size and slice
    bucket: as one, a dataset whose volumes differ in size (TotalSegmentator's mostly do) compiled
    the whole encoder again for nearly every volume (the first ViT-B volume took 80 s on an H100,
    1.4 s after: benchmarks/results/gpu_vitb_bf16_whole.md). Dispatch is
    asynchronous, so the host does not wait between them."""
    images = _preprocess_chunk(hu_slices, indices, config=config, window=window)
    emb = encode_images(variables, images, config=config, dtype=dtype, attention=attention)
    return _store_embeddings(embeddings, emb, indices)


@functools.partial(jax.jit, static_argnames=("geo", "preprocessing"))
def _logits_to_masks(logits, *, geo: Geometry, preprocessing: str):
    """(Zp, m, m) low-res logits -> (Zp, H, W) uint8 masks on the model-frame slice grid."""
    return logits_to_mask(logits, geo, preprocessing).astype(jnp.uint8)


@dataclasses.dataclass
class VolumeResult:
    """mask: uint8 (X, Y, Z) on the volume's grid (1 = object); iou: float32 (Z,) the model's IoU
    prediction for each segmented slice, NaN elsewhere; bounds: (lo, hi) segmented slices;
    logits: (Zp, m, m) primary low-res logits in the model frame (device array; EMPTY_LOGIT where
    not segmented); all_masks: uint8 (M, X, Y, Z) every output mask of the decoder on the volume's
    grid, index 0 the primary (= mask), 1.. the secondary ones (oracle), or None (only
    `segment_slices(..., all_masks=True)` fills it)."""

    mask: np.ndarray
    iou: np.ndarray
    bounds: tuple[int, int]
    logits: Any = None
    all_masks: Optional[np.ndarray] = None


@dataclasses.dataclass
class _ObjectState:
    """What `edit` needs from the last `segment`: bounds, mode, corrections, boxes, current logits."""

    lo: int
    hi: int
    start: Optional[int]  # the slice of the user's prompt (None: slice-level prompts)
    propagation: str
    table_points: np.ndarray  # (Zp, P, 2) model-input pixels
    table_labels: np.ndarray  # (Zp, P) int32, -1 = empty slot
    table_boxes: np.ndarray  # (Zp, 4) model-input pixels: the box prompt given on each slice
    table_has_box: np.ndarray  # (Zp,) bool
    logits: Any  # (Zp, m, m) device
    iou: Any  # (Zp,) device
    slice_level: bool = False


_SLICE_PROMPT_KEYS = ("points", "point_labels", "box")


def _slice_prompt_items(prompts) -> list:
    """`segment_slices`' prompts ({slice: {...}} or a list of {"slice": k, ...}) -> [(k, dict)], with
    every entry checked: a dict, with a "slice" key in the list form, and no unknown key."""
    if isinstance(prompts, Mapping):
        items, allowed = list(prompts.items()), _SLICE_PROMPT_KEYS
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        items, allowed = [(None, p) for p in prompts], ("slice",) + _SLICE_PROMPT_KEYS
    else:
        raise TypeError("segment_slices prompts must be {slice: {\"points\", \"point_labels\", \"box\"}} or a list of "
                        f"dicts with a \"slice\" key, got {type(prompts).__name__}")
    out = []
    for i, (k, p) in enumerate(items):
        where = f"prompts[{i}]" if k is None else f"the prompt for slice {k!r}"
        if not isinstance(p, Mapping):
            raise TypeError(f"{where} must be a dict with keys from {allowed}, got {type(p).__name__} {p!r:.80}")
        unknown = sorted(str(key) for key in p if key not in allowed)
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: {allowed}")
        if k is None:
            if "slice" not in p:
                raise ValueError(f"{where} has no \"slice\" key (the slice index the prompt is on): {p!r:.80}")
            k = p["slice"]
        out.append((k, p))
    return out


class VolumePredictor:
    """Runs a `RadSam` model over the slices of one volume at a time; see the module docstring.

    encoder_batch_size: slices per encoder call (memory vs. speed; None: `default_encoder_batch_size`,
    1 on CPUs, 8 on accelerators). dtype: compute dtype
    (None = the model's; jnp.bfloat16 halves activation and embedding memory). vanish_policy:
    "stop" or "continue" (see `radsam_jax.inference.propagation`). bucket: slice-count padding
    (int multiple or sequence of sizes). max_points: point slots per prompt and stored corrections
    per slice (static). intensity: "hu" or "percentile" (None: the model's `config.intensity`; see
    `radsam_jax.preprocess`). window: (level, width) in those units (None: the model's
    `config.ct_window`, the window it was trained with, or the default window of another intensity).
    """

    def __init__(self, model: RadSam, *, encoder_batch_size: Optional[int] = None, dtype=None, vanish_policy: str = "stop",
                 bucket: Bucket = 32, max_points: int = DEFAULT_MAX_POINTS,
                 window: Optional[tuple[float, float]] = None, intensity: Optional[str] = None):
        if not (hasattr(model, "config") and hasattr(model, "variables")):
            raise TypeError(f"model must be a RadSam (e.g. load_checkpoint(path)), got {type(model).__name__} {model!r:.80}")
        if dtype is not None:
            check_compute_dtype(dtype)
        if vanish_policy not in VANISH_POLICIES:
            raise ValueError(f"vanish_policy must be one of {VANISH_POLICIES}, got {vanish_policy!r}")
        if encoder_batch_size is None:
            encoder_batch_size = default_encoder_batch_size()
        for name, value in (("encoder_batch_size", encoder_batch_size), ("max_points", max_points)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        bucket_size(1, bucket)  # validates
        self.model = model
        self.attention = getattr(model, "attention", "chunked")
        self.config = model.config
        self.variables = model.variables
        self.dtype = jnp.dtype(dtype if dtype is not None else model.dtype)
        self.encoder_batch_size = int(encoder_batch_size)
        self.vanish_policy = vanish_policy
        self.bucket = bucket
        self.max_points = int(max_points)
        intensity = check_intensity(model.config.intensity if intensity is None else intensity)
        if window is None:
            window = model.config.ct_window if intensity == model.config.intensity else DEFAULT_WINDOWS[intensity]
        if not is_valid_ct_window(window):
            raise ValueError(f"window must be (level, width) with width > 0, got {window!r}")
        self.intensity = intensity
        self.window = (float(window[0]), float(window[1]))
        self.decode_fn = sam_decoder(self.config, self.dtype)
        self.volume = None
        self._state: Optional[_ObjectState] = None

    # ------------------------------------------------------------------------------------------
    # Volume and encoder
    # ------------------------------------------------------------------------------------------

    def set_volume(self, volume, *, encode: str = "lazy", progress: Optional[Callable[[int], Any]] = None) -> None:
        """Takes a `radsam_jax.io.Volume` (or anything with `.array` (X, Y, Z) and `.affine`): HU, or
        MR intensities for intensity "percentile".

        Uploads the reoriented slices, in the units of `self.intensity` (also kept as
        `self.intensities` on the file's grid, for previews), to the device once; encode="all" encodes
        every slice now, "lazy" (default) only when a call needs them. Forgets the previous volume and
        object; a volume that cannot be normalised (ValueError) keeps the current one.
        """
        if encode not in ("lazy", "all"):  # before anything changes: a bad call keeps the current volume
            raise ValueError(f"encode must be 'lazy' or 'all', got {encode!r}")
        if not hasattr(volume, "array"):
            raise TypeError(f"volume must be a radsam_jax.io.Volume (anything with .array (X, Y, Z) and .affine; "
                            f"e.g. load_volume(path) or Volume(array, affine)), got {type(volume).__name__}")
        array = np.asarray(volume.array)
        if array.ndim != 3:
            raise ValueError(f"the volume must be 3D (X, Y, Z), got shape {array.shape}")
        if min(array.shape) < 1:
            raise ValueError(f"the volume is empty: shape {array.shape}")
        name = getattr(volume, "path", "") or "the volume"
        values = volume_intensities(array, self.intensity, name)
        doubt = not_hu_reason(array, name) if self.intensity == "hu" else None
        if doubt:
            warnings.warn(f"{doubt}, which this model's window ({self.window[0]:g}/{self.window[1]:g}) expects; for "
                          f"MRI use intensity 'percentile' (--intensity percentile)", stacklevel=2)
        affine = getattr(volume, "affine", None)
        frame = SliceFrame.identity(array.shape) if affine is None else SliceFrame.from_affine(affine, array.shape)
        if affine is not None:  # nothing is resampled: a thick-slice sagittal/coronal series gives thin, long pixels
            sides = [float(np.linalg.norm(np.asarray(affine)[:3, a])) for a in range(3) if a != frame.slice_axis]
            if max(sides) > 2 * min(sides):
                warnings.warn(f"{name}: its axial slices have pixels of {sides[0]:.2g} x {sides[1]:.2g} mm, far from "
                              f"square (a thick-slice sagittal or coronal series?); the model was trained on square "
                              f"pixels: resample the volume first for better masks", stacklevel=2)
        canon = frame.to_canonical(values)  # (N0 = R, N1 = A, Z)
        z = array.shape[frame.slice_axis]
        zp = bucket_size(z, self.bucket)
        # Model-frame slice k is canon[:, :, k].T: (H = N1 rows, W = N0 columns).
        slices = np.full((zp, canon.shape[1], canon.shape[0]), -1000.0, np.float32)
        slices[:z] = np.transpose(canon, (2, 1, 0))
        self.volume = volume
        self.intensities = values
        self.frame = frame
        self.num_slices = z
        self.padded_slices = zp
        self.geo = geometry(self.config, slices.shape[1], slices.shape[2])
        self._resized = jnp.asarray(self.geo.resized, jnp.int32)  # the image within the input: prompts stay inside
        self._slices = jnp.asarray(slices)
        e, c = self.config.embedding_size, self.config.prompt_embed_dim
        self._embeddings = jnp.zeros((zp, e, e, c), self._embedding_dtype)
        m = self.config.mask_size
        self._empty_logits = jnp.full((zp, m, m), EMPTY_LOGIT, jnp.float32)  # "no current mask" for segment
        self._empty_iou = jnp.asarray(np.full((zp,), np.nan, np.float32))  # a transfer: no eager op to compile
        self._encoded = np.zeros((z,), bool)
        self._state = None
        if encode == "all":
            self.encode_slices(0, z - 1, progress=progress)

    @functools.cached_property
    def _embedding_dtype(self):
        """The encoder's output dtype, from tracing it once per predictor: tracing takes longer than
        encoding a small volume (0.8 s per `set_volume` for the bundled model on the CPU)."""
        encode = functools.partial(encode_images, config=self.config, dtype=self.dtype, attention=self.attention)
        size = self.config.image_size
        return jax.eval_shape(encode, self.variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).dtype

    def _require_volume(self):
        if self.volume is None:
            raise RuntimeError("no volume: call set_volume(volume) first")

    def encode_slices(self, lo: int, hi: int, progress: Optional[Callable[[int], Any]] = None) -> int:
        """Encodes the not-yet-cached slices lo..hi (inclusive) in chunks; returns how many it encoded."""
        self._require_volume()
        lo, hi = self._check_slice(lo, "lo"), self._check_slice(hi, "hi")  # a negative index would wrap into padding
        if lo > hi:
            raise ValueError(f"encode_slices needs lo <= hi, got {lo} > {hi}")
        todo = np.flatnonzero(~self._encoded[lo: hi + 1]) + lo
        return self._encode_indices(todo, progress)

    def _encode_indices(self, todo: np.ndarray, progress=None) -> int:
        b = self.encoder_batch_size
        for start in range(0, len(todo), b):
            chunk = todo[start: start + b]
            # A short last chunk repeats its last slice: same shape, same compiled function.
            idx = np.concatenate([chunk, np.full(b - len(chunk), chunk[-1])]).astype(np.int32)
            self._embeddings = _encode_into(self.variables, self._embeddings, self._slices, jnp.asarray(idx),
                                            config=self.config, dtype=self.dtype, window=self.window,
                                            attention=self.attention)
            self._encoded[chunk] = True
            if progress is not None:
                jax.block_until_ready(self._embeddings)
                progress(len(chunk))
        return len(todo)

    @property
    def embeddings(self) -> jax.Array:
        """(Zp, e, e, C) cached embeddings (zeros for slices not yet encoded). The next encode reuses
        this buffer (donated, no copy) and deletes this array: to keep it, copy it (`np.asarray`)."""
        self._require_volume()
        return self._embeddings

    # ------------------------------------------------------------------------------------------
    # Prompt conversion and checks
    # ------------------------------------------------------------------------------------------

    def _check_slice(self, k, what="slice") -> int:
        try:
            whole = not isinstance(k, (bool, np.bool_, str, bytes)) and float(k).is_integer()
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise ValueError(f"{what} index must be an integer, got {k!r}")
        k = int(k)
        if not 0 <= k < self.num_slices:
            raise ValueError(f"{what} {k} is outside the image, which has slices 0..{self.num_slices - 1}")
        return k

    def _check_bounds(self, bounds, slice_index) -> tuple[int, int]:
        if bounds is None:
            return 0, self.num_slices - 1
        if isinstance(bounds, (str, bytes)) or np.ndim(bounds) != 1 or len(bounds) != 2:
            raise ValueError(f"bounds must be (lo, hi), got {bounds!r}")
        lo, hi = self._check_slice(bounds[0], "bound lo"), self._check_slice(bounds[1], "bound hi")
        if lo > hi:
            raise ValueError(f"bounds lo={lo} > hi={hi}: give the lower slice index first")
        if not lo <= slice_index <= hi:
            raise ValueError(f"slice {slice_index} is outside the bounds {lo}..{hi}")
        return lo, hi

    def _points_to_model(self, points, point_labels) -> tuple[np.ndarray, np.ndarray]:
        """File voxel points (N, 2) + labels -> model-input points and labels padded to max_points."""
        pts = np.zeros((self.max_points, 2), np.float32)
        labels = -np.ones((self.max_points,), np.int32)
        if points is None or (not isinstance(points, (str, bytes)) and np.size(points) == 0):
            if point_labels is not None and np.size(point_labels) > 0:
                raise ValueError(f"point_labels {point_labels!r} given without points")
            return pts, labels
        try:
            p = np.asarray(points, np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"points must be (N, 2) numbers (x, y), got {points!r}") from None
        if not (p.shape == (2,) or (p.ndim == 2 and p.shape[1] == 2)):
            raise ValueError(f"points must be (N, 2) (x, y) in voxel coordinates, got shape {p.shape}: {points!r}")
        p = p.reshape(-1, 2)
        if point_labels is None:
            raise ValueError("points given without point_labels (1 = positive, 0 = negative)")
        try:
            lab = np.asarray(point_labels, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"point_labels must be 1 (positive) or 0 (negative), got {point_labels!r}") from None
        if lab.shape[0] != p.shape[0]:
            raise ValueError(f"{p.shape[0]} points but {lab.shape[0]} point labels")
        if not np.isin(lab, (0, 1)).all():  # before any cast: 0.7 is an error, not 0
            raise ValueError(f"point_labels must be 1 (positive) or 0 (negative), got {lab.tolist()}")
        lab = lab.astype(np.int64)
        if p.shape[0] > self.max_points:
            raise ValueError(f"{p.shape[0]} points exceed max_points={self.max_points}")
        self._check_inside(p, "point")
        pts[: len(p)] = points_to_input(self.frame.points_to_canonical(p), self.geo)
        labels[: len(p)] = lab
        return pts, labels

    def _check_inside(self, p: np.ndarray, what: str) -> None:
        n0, n1 = self.frame.shape
        for x, y in np.asarray(p).reshape(-1, 2):
            if not (np.isfinite(x) and np.isfinite(y) and -0.5 <= x <= n0 - 0.5 and -0.5 <= y <= n1 - 0.5):
                raise ValueError(
                    f"{what} ({x:g}, {y:g}) is outside the image: x must lie in 0..{n0 - 1} (first axis) "
                    f"and y in 0..{n1 - 1} (second axis)"
                )

    def _box_to_model(self, box) -> np.ndarray:
        try:
            b = np.asarray(box, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"box must be four numbers x0, y0, x1, y1, got {box!r}") from None
        if b.shape != (4,):
            raise ValueError(f"box must be x0, y0, x1, y1, got {box!r}")
        self._check_inside(b.reshape(2, 2), "box corner")
        if b[0] > b[2] or b[1] > b[3]:
            raise ValueError(f"box {b.tolist()} must have x0 <= x1 and y0 <= y1")
        return box_to_input(self.frame.box_to_canonical(b), self.geo)

    # ------------------------------------------------------------------------------------------
    # Volume-level prompting and edits
    # ------------------------------------------------------------------------------------------

    def segment(self, slice_index: int, points=None, point_labels=None, box=None, bounds=None,
                propagation: str = "mask", progress: Optional[Callable[[int], Any]] = None, mask=None) -> VolumeResult:
        """Volume-level prompting: a point(s), box and/or mask prompt on `slice_index`, propagated to `bounds`.

        points (N, 2) / box (x0, y0, x1, y1) in file voxel coordinates; point_labels 1/0; mask: the
        object drawn on slice `slice_index` (a binary array of the slice's shape, e.g. of
        `volume.array[:, :, k]` for an axial file; the paper's "manually drawing a mask"; models
        trained on binary mask prompts only). bounds (lo, hi) inclusive, default the whole volume.
        propagation: "mask" (RadSAM) or "box" (SAM/MedSAM). Starts a new object: corrections of the
        previous one are forgotten. The points and the box are stored with the object and re-sent
        whenever `slice_index` is decoded again (an edit there, or a re-propagation from another
        slice passing it); the drawn mask is the start slice's mask until then.
        """
        self._require_volume()
        if propagation not in PROPAGATION_MODES:
            raise ValueError(f"propagation must be one of {PROPAGATION_MODES}, got {propagation!r}")
        k = self._check_slice(slice_index)
        lo, hi = self._check_bounds(bounds, k)
        if (points is None or np.size(points) == 0) and box is None and mask is None:
            raise ValueError(f"segment needs a prompt: at least one point, a box or a mask, got points={points!r}, "
                             f"box=None, mask=None")
        drawn = None if mask is None else self._drawn_mask_prompt(mask, k)
        pts, labels = self._points_to_model(points, point_labels)
        if box is not None:
            bx, has_box = self._box_to_model(box), True
        else:
            bx, has_box = np.zeros(4, np.float32), False
        tables = self._empty_tables()
        # The user's points count as corrections on their slice and the box is stored there too:
        # both are re-sent when an edit there or elsewhere decodes that slice again.
        tables["table_points"][k], tables["table_labels"][k] = pts, labels
        tables["table_boxes"][k], tables["table_has_box"][k] = bx, has_box
        self.encode_slices(lo, hi, progress=progress)
        state = _ObjectState(lo, hi, k, propagation, **tables, logits=self._empty_logits, iou=self._empty_iou)
        logits, iou = self._propagate(state, k, lo, hi, use_current=False, drawn=drawn)
        self._state = dataclasses.replace(state, logits=logits, iou=iou)
        return self._result(logits, iou, (lo, hi))

    def _drawn_mask_prompt(self, mask, k: int) -> np.ndarray:
        """A mask drawn on file slice k -> its (m, m) binary mask prompt in the model frame, made as
        training makes one from a mask."""
        if self.config.mask_prompt != "binary":
            raise ValueError("a drawn mask prompt needs a model trained on binary mask prompts (mask_prompt 'binary', "
                             "as radsam train writes); this model reads SAM's own low-resolution logits as its mask prompt")
        m = np.asarray(mask)
        if m.shape != self.frame.shape:
            raise ValueError(f"mask must have the shape of slice {k} of the volume's array, {self.frame.shape}, got {m.shape}")
        if m.dtype != bool and not np.isin(m, (0, 1)).all():
            raise ValueError(f"mask must be binary (bool or 0/1), got values {np.unique(m)[:5].tolist()}")
        if not m.any():
            raise ValueError(f"mask is empty: draw the object on slice {k}")
        from radsam_jax.data.pipeline import InputSpec, mask_to_prompt_np  # the training's mask prompt

        canonical = self.frame.to_canonical(np.expand_dims(m.astype(np.float32), self.frame.slice_axis))[:, :, 0]
        low = mask_to_prompt_np(canonical.T, InputSpec.from_model_config(self.config))  # model frame: rows = N1
        return low.astype(np.float32)

    def _empty_tables(self) -> dict:
        zp = self.padded_slices
        return {
            "table_points": np.zeros((zp, self.max_points, 2), np.float32),
            "table_labels": -np.ones((zp, self.max_points), np.int32),
            "table_boxes": np.zeros((zp, 4), np.float32),
            "table_has_box": np.zeros((zp,), bool),
        }

    def _add_points(self, k: int, points, point_labels, table_points, table_labels) -> None:
        """Appends correction points on slice k to the (copied) tables; checks them first."""
        if points is None or np.size(points) == 0:
            raise ValueError(f"an edit needs at least one correction point (slice {k})")
        new_pts, new_labels = self._points_to_model(points, point_labels)
        n_new = int((new_labels != -1).sum())
        used = int((table_labels[k] != -1).sum())
        if used + n_new > self.max_points:
            raise ValueError(f"slice {k} would hold {used + n_new} correction points, more than max_points={self.max_points}")
        table_points[k, used: used + n_new] = new_pts[:n_new]
        table_labels[k, used: used + n_new] = new_labels[:n_new]

    def edit(self, slice_index: int, points, point_labels) -> VolumeResult:
        """Correction points on `slice_index` (1 = add, 0 = remove): decodes that slice with all its
        stored corrections, its stored box (if the object's box prompt was given on this slice) and
        the current mask as the mask prompt, in either propagation mode (the paper's edit, section
        3.5), then re-propagates in both directions to the object's bounds; towards the slice of the
        object's prompt only until the mask vanishes (the slices beyond keep their masks: a click that
        empties a leaked slice removes the leak, not the object behind it). The corrections are
        remembered and re-applied whenever a later re-propagation passes this slice.

        After `segment_slices` (slice-level), this is `edit_slices({slice_index: (points,
        point_labels)})`: that slice only, no propagation."""
        self._require_volume()
        state = self._state
        if state is None:
            raise RuntimeError("edit needs an object: call segment (or segment_slices) first")
        if state.slice_level:
            return self.edit_slices({slice_index: (points, point_labels)})
        k = self._check_slice(slice_index)
        if not state.lo <= k <= state.hi:
            raise ValueError(f"slice {k} is outside the bounds {state.lo}..{state.hi} of the object being edited")
        table_points, table_labels = state.table_points.copy(), state.table_labels.copy()
        self._add_points(k, points, point_labels, table_points, table_labels)
        self.encode_slices(k, k)
        state = dataclasses.replace(state, table_points=table_points, table_labels=table_labels)
        logits, iou = self._propagate(state, k, state.lo, state.hi, use_current=True)
        self._state = dataclasses.replace(state, logits=logits, iou=iou)
        return self._result(logits, iou, (state.lo, state.hi))

    def _propagate(self, state: _ObjectState, k: int, lo: int, hi: int, *, use_current: bool,
                   drawn: Optional[np.ndarray] = None):
        """The one path of `segment` and `edit`: every argument is built the same way (host NumPy ->
        device, the start prompt by the jitted `start_prompt`), so an edit after a segment re-uses
        the compiled propagation. drawn: a drawn (m, m) mask prompt for slice k, sent as it is."""
        points, labels = jnp.asarray(state.table_points[k]), jnp.asarray(state.table_labels[k])
        box, has_box = jnp.asarray(state.table_boxes[k]), jnp.asarray(state.table_has_box[k])
        if drawn is None:
            prompt = start_prompt(points, labels, box, has_box, state.logits, jnp.int32(k), jnp.asarray(use_current, bool),
                                  self._resized, mask_prompt=self.config.mask_prompt)
        else:
            prompt = single_prompt(points, labels, box, has_box, drawn, True)
        return propagate_volume(
            self.decode_fn, self.variables, self._embeddings, jnp.int32(k), jnp.int32(lo), jnp.int32(hi), prompt,
            jnp.asarray(state.table_points), jnp.asarray(state.table_labels),
            jnp.asarray(state.table_boxes), jnp.asarray(state.table_has_box), self._resized, (state.logits, state.iou),
            jnp.int32(state.start), image_size=self.config.image_size, mode=state.propagation, vanish_policy=self.vanish_policy,
            mask_prompt=self.config.mask_prompt,
        )

    # ------------------------------------------------------------------------------------------
    # Slice-level prompting
    # ------------------------------------------------------------------------------------------

    def segment_slices(self, prompts: Union[Mapping[int, Mapping[str, Any]], Sequence[Mapping[str, Any]]],
                       all_masks: bool = False) -> VolumeResult:
        """Slice-level prompting: one prompt per slice, all slices decoded in one batched call.

        prompts: {slice_index: {"points": ..., "point_labels": ..., "box": ...}} or a list of dicts
        with a "slice" key. Slices without a prompt stay empty. all_masks=True also returns every
        output mask of the decoder (`VolumeResult.all_masks`, (M, X, Y, Z) uint8, index 0 the
        primary; 1.. the secondary masks for the oracle Dice). `edit_slices` (or `edit`) afterwards
        corrects slices (no propagation); the points and boxes given here are stored and re-sent.
        """
        self._require_volume()
        items = _slice_prompt_items(prompts)
        if not items:
            raise ValueError("segment_slices needs at least one slice prompt")
        n = len(items)
        nb = bucket_size(n, self.bucket)
        m = self.config.mask_size
        idx = np.full((nb,), self.padded_slices, np.int32)  # padding rows are dropped
        pts = np.zeros((nb, self.max_points, 2), np.float32)
        labels = -np.ones((nb, self.max_points), np.int32)
        boxes = np.zeros((nb, 4), np.float32)
        has_box = np.zeros((nb,), bool)
        seen = set()
        for i, (k, p) in enumerate(items):
            k = self._check_slice(k)
            if k in seen:
                raise ValueError(f"slice {k} has more than one prompt")
            seen.add(k)
            if (p.get("points") is None or np.size(p["points"]) == 0) and p.get("box") is None:
                raise ValueError(f"the prompt for slice {k} has neither points nor a box")
            idx[i] = k
            pts[i], labels[i] = self._points_to_model(p.get("points"), p.get("point_labels"))
            if p.get("box") is not None:
                boxes[i], has_box[i] = self._box_to_model(p["box"]), True
        self._encode_indices(np.array(sorted(k for k in seen if not self._encoded[k]), np.int64))
        batch = Prompts(jnp.asarray(pts), jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(has_box),
                        jnp.zeros((nb, m, m), jnp.float32), jnp.zeros((nb,), bool))
        logits, iou = decode_slices(self.decode_fn, self.variables, self._embeddings, jnp.asarray(idx), batch,
                                    all_masks=bool(all_masks))
        every = None
        if all_masks:
            every, logits, iou = logits, logits[:, 0], iou[:, 0]
        tables = self._empty_tables()
        for i, (k, _) in enumerate(items):
            k = int(k)
            tables["table_points"][k], tables["table_labels"][k] = pts[i], labels[i]
            tables["table_boxes"][k], tables["table_has_box"][k] = boxes[i], has_box[i]
        lo, hi = min(seen), max(seen)
        self._state = _ObjectState(lo, hi, None, "mask", **tables, logits=logits, iou=iou, slice_level=True)
        return self._result(logits, iou, (lo, hi), all_logits=every)

    def edit_slices(self, edits: Mapping[int, tuple[Any, Any]]) -> VolumeResult:
        """Slice-level edits, batched: {slice_index: (points, point_labels)} correction points on
        several slices (1 = add, 0 = remove). Each slice is decoded once, in one batched decoder call,
        with all its stored points (its prompt from `segment_slices` + every correction so far), its
        stored box, and its current mask as the mask prompt; no propagation, other slices unchanged.
        The same as one `edit` per slice (a slice's edit never affects another slice here).

        Needs an object from `segment_slices`."""
        self._require_volume()
        state = self._state
        if state is None:
            raise RuntimeError("edit_slices needs an object: call segment_slices first")
        if not state.slice_level:
            raise RuntimeError("edit_slices is for slice-level objects (segment_slices); after segment, use edit")
        if not isinstance(edits, Mapping):
            raise TypeError(f"edit_slices needs a mapping {{slice: (points, point_labels)}}, got {type(edits).__name__} "
                            f"{edits!r:.80}")
        if not edits:
            raise ValueError("edit_slices needs a non-empty mapping {slice: (points, point_labels)}, got {}")
        table_points, table_labels = state.table_points.copy(), state.table_labels.copy()
        ks = []
        for k, pair in edits.items():
            k = self._check_slice(k)
            if k in ks:
                raise ValueError(f"slice {k} is edited more than once")
            try:
                points, point_labels = pair
            except (TypeError, ValueError):
                raise ValueError(f"the edit of slice {k} must be (points, point_labels), got {pair!r}") from None
            self._add_points(k, points, point_labels, table_points, table_labels)
            ks.append(k)
        self._encode_indices(np.array(sorted(k for k in ks if not self._encoded[k]), np.int64))
        nb = bucket_size(len(ks), self.bucket)
        idx = np.full((nb,), self.padded_slices, np.int32)  # padding rows are dropped
        idx[: len(ks)] = ks
        rows = np.clip(idx, 0, self.padded_slices - 1)
        logits, iou = redecode_slices(
            self.decode_fn, self.variables, self._embeddings, jnp.asarray(idx), jnp.asarray(table_points[rows]),
            jnp.asarray(table_labels[rows]), jnp.asarray(state.table_boxes[rows]), jnp.asarray(state.table_has_box[rows]),
            state.logits, state.iou, self._resized, mask_prompt=self.config.mask_prompt,
        )
        lo, hi = min(state.lo, *ks), max(state.hi, *ks)  # a slice first segmented by its edit counts too
        self._state = dataclasses.replace(state, lo=lo, hi=hi, table_points=table_points, table_labels=table_labels,
                                          logits=logits, iou=iou)
        return self._result(logits, iou, (lo, hi))

    # ------------------------------------------------------------------------------------------
    # Results
    # ------------------------------------------------------------------------------------------

    def _to_volume_grid(self, logits) -> np.ndarray:
        """(Zp, m, m) model-frame logits -> uint8 (X, Y, Z) mask on the volume's grid."""
        masks = _logits_to_masks(logits, geo=self.geo, preprocessing=self.config.preprocessing)
        masks = np.asarray(masks)[: self.num_slices]  # the single transfer to the host: (Z, H, W)
        canon = np.transpose(masks, (2, 1, 0))  # (N0, N1, Z)
        return np.ascontiguousarray(self.frame.from_canonical(canon), dtype=np.uint8)

    def _result(self, logits, iou, bounds, all_logits=None) -> VolumeResult:
        mask = self._to_volume_grid(logits)
        iou_host = np.asarray(iou, np.float32)[: self.num_slices]
        every = None
        if all_logits is not None:  # (Zp, M, m, m): one mask index at a time, through the same path
            every = np.stack([mask] + [self._to_volume_grid(all_logits[:, i]) for i in range(1, all_logits.shape[1])])
        return VolumeResult(mask, iou_host, (int(bounds[0]), int(bounds[1])), logits, every)
