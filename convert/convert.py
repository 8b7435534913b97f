"""Converts SAM-family PyTorch checkpoints (SAM, MedSAM, Hugging Face SamModel) to RadSAM checkpoints.

    convert_checkpoint("sam_vit_b_01ec64.pth", "checkpoints/sam_vit_b")        # -> RadSam

Steps: read the source lazily (torch.load with mmap, or safetensors without torch) -> detect its
key format -> map every key through the declarative table in key_maps.py -> infer (or take) the
model config -> compare with `abstract_variables(config)` -> report every missing, unused and
mis-shaped key at once, or write the Orbax checkpoint atomically with `save_model`.
torch is imported here only to read .pth/.bin files (radsam_jax never imports it; reference.py and
the benchmarks build PyTorch SAM models to compare against).
"""

import collections
import contextlib
import dataclasses
import json
import re
import signal
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from radsam_jax.checkpoint import expected_shapes, save_model, signals_held
from radsam_jax.io import check_output_path, file_sha256, files_sha256
from radsam_jax.model.config import MASK_PROMPT_ENCODINGS, PREPROCESSING_MODES, ModelConfig, load_model_config
from radsam_jax.model.sam import RadSam
from radsam_jax.convert.infer_arch import ArchitectureError, infer_config_by_majority
from radsam_jax.convert.key_maps import IGNORED_KEYS, KEY_MAPS

FORMATS = ("auto", "segment_anything", "hf")
# auto: inferred from the shapes, and refused where it has a preset's widths but not all its blocks or
# layers (a truncated file); custom: inferred, whatever it matches.
MODELS = ("auto", "custom", "vit_b", "vit_l", "vit_h", "small")
# Containers some training scripts wrap the state dict in.
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_HF_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_SHARD_INDEX_SUFFIX = ".index.json"  # a Hugging Face checkpoint saved in shards: {"weight_map": {key: shard file}}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says which file, key and shape."""


# --------------------------------------------------------------------------- reading sources


@dataclasses.dataclass
class StateDict:
    """A lazily read state dict: `shape(key)` is cheap, `load(key)` returns a float32 numpy array."""

    file: Path
    container: str  # "pytorch-zip", "pytorch-pickle" or "safetensors"
    keys: list[str]
    shape: Callable[[str], tuple]
    load: Callable[[str], np.ndarray]
    shards: tuple = ()  # the files a shard index (`file`) names

    def sha256(self) -> str:
        """The source's sha256: of its file, or for shards of the index's and every shard's in order."""
        return files_sha256([self.file, *self.shards]) if self.shards else file_sha256(self.file)


def _file_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            raise ConversionError(f"{path}: truncated or damaged checkpoint (a zip archive without its central directory)")
        with zipfile.ZipFile(path) as archive:  # torch.load does not check the members' CRC-32: damaged bytes load
            # (all CRCs 0: saved with torch.serialization.set_crc32_options(False), nothing to check)
            damaged = archive.testzip() if any(info.CRC for info in archive.infolist()) else None
        if damaged is not None:
            raise ConversionError(f"{path}: damaged checkpoint: its member {damaged} fails its CRC-32 check (tensor data "
                                  f"changed after it was written; download or copy the file again)")
        return "pytorch-zip"
    if head[:1] == b"\x80":  # pickle protocol >= 2: PyTorch's legacy (non-zip) format
        return "pytorch-pickle"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        return "safetensors"
    raise ConversionError(f"{path} is not a checkpoint: neither a PyTorch file (.pth/.pt/.bin) nor safetensors")


def _finite(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """`x`, unless it holds NaN or infinite values: no trained weight does, a damaged file may."""
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ConversionError(f"{path}: tensor {key} holds {bad} NaN or infinite value(s) of {np.size(x)} "
                              f"(a damaged file, or weights that diverged in training)")
    return x


def _unwrap(obj: Any, path: Path) -> dict:
    import torch

    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict) and not isinstance(obj[key], torch.Tensor):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return obj


def _weights_only_globals() -> list:
    """Plain-data types that training scripts save beside the weights (a best score as a numpy float,
    argparse's Namespace of options), which torch.load(weights_only=True) refuses by default."""
    import argparse

    scalar = getattr(getattr(np, "_core", np.core), "multiarray").scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [scalar, np.dtype, *dtypes, argparse.Namespace]


def _load_error(path: Path, e: Exception) -> ConversionError:
    """torch.load's error in one line: its 'Unsupported global' line where it names one, no terminal escapes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    reason = next((line for line in lines if "Unsupported global" in line), next((line for line in lines if line), ""))
    reason = reason.split(". Please use")[0].removeprefix("WeightsUnpickler error: ")  # its advice is for code
    hint = (": the file pickles more than tensors; if you trust it, re-save its state dict alone: with "
            "obj = torch.load(f, weights_only=False), torch.save(obj.state_dict(), 'weights.pth') for a whole "
            "model, torch.save(obj['model'], 'weights.pth') for a dict holding one") if "Unsupported global" in reason else ""
    return ConversionError(f"{path}: cannot read the PyTorch checkpoint ({type(e).__name__}: {reason}){hint}")


def _torch_state_dict(path: Path, container: str) -> StateDict:
    import torch  # only here: reading PyTorch files is the one place torch is needed

    try:
        # mmap keeps the tensors on disk until each is converted, so a checkpoint converts within
        # about twice its size in memory; weights_only refuses arbitrary pickled code.
        with torch.serialization.safe_globals(_weights_only_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=container == "pytorch-zip")
    except Exception as e:
        raise _load_error(path, e) from e
    state = _unwrap(obj, path)

    def load(key: str) -> np.ndarray:
        t = state[key].detach()
        if not t.dtype.is_floating_point:
            raise ConversionError(f"{path}: tensor {key} is {t.dtype}, not floating point: not a weight (damaged or quantised?)")
        return _finite((t if t.dtype == torch.float32 else t.float()).numpy(), path, key)

    return StateDict(path, container, list(state), lambda k: tuple(state[k].shape), load)


@contextlib.contextmanager
def _safetensors_state_dict(path: Path) -> Iterator[StateDict]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="np")
        f = handle.__enter__()
        keys = list(f.keys())
    except Exception as e:
        raise ConversionError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from e
    try:
        if not keys:
            raise ConversionError(f"{path} holds no tensors")

        def load(key: str) -> np.ndarray:
            try:
                x = f.get_tensor(key)
            except Exception as e:
                raise ConversionError(f"{path}: cannot read tensor {key} ({type(e).__name__}: {e})") from e
            if not jnp.issubdtype(x.dtype, jnp.floating):  # numpy's floats and ml_dtypes' bfloat16 (bf16 fine-tunes)
                raise ConversionError(f"{path}: tensor {key} is {x.dtype}, not floating point: not a weight (damaged or quantised?)")
            return _finite(x if x.dtype == np.float32 else x.astype(np.float32), path, key)

        yield StateDict(path, "safetensors", keys, lambda k: tuple(f.get_slice(k).get_shape()), load)
    finally:
        handle.__exit__(None, None, None)


def _resolve_source(src: Path) -> Path:
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    if src.is_dir():
        for name in _HF_DIR_FILES:
            if (src / name).is_file():
                return src / name
        raise ConversionError(f"{src} is a directory without {' or '.join(_HF_DIR_FILES)}")
    return src


@contextlib.contextmanager
def open_state_dict(src) -> Iterator[StateDict]:
    """The state dict in a .pth/.pt/.bin/.safetensors file or a Hugging Face model directory, its SAM
    keys without the prefix a wrapper put before them (see `_without_prefix`)."""
    path = _resolve_source(Path(src))
    if path.name.endswith(_SHARD_INDEX_SUFFIX):
        with _sharded_state_dict(path) as state:
            yield _without_prefix(state)
        return
    with _file_state_dict(path) as state:
        yield _without_prefix(state)


@contextlib.contextmanager
def _file_state_dict(path: Path) -> Iterator[StateDict]:
    kind = _file_kind(path)
    if kind == "safetensors":
        with _safetensors_state_dict(path) as state:
            yield state
    else:
        yield _torch_state_dict(path, kind)


@contextlib.contextmanager
def _sharded_state_dict(index: Path) -> Iterator[StateDict]:
    """The shards an index names, read as one state dict (each tensor from the shard holding it)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("an empty or non-object weight_map")
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{index} is not a shard index (a JSON object with a weight_map of key -> shard file): "
                              f"{type(e).__name__}: {e}") from None
    files = sorted(set(map(str, weight_map.values())))
    absent = [name for name in files if not (index.parent / name).is_file()]
    if absent:
        raise ConversionError(f"{index}: shard(s) {', '.join(absent)} not found beside it")
    with contextlib.ExitStack() as stack:
        holder = {}  # key -> the shard's StateDict
        for name in files:
            shard = stack.enter_context(_file_state_dict(index.parent / name))
            holder.update(dict.fromkeys(shard.keys, shard))
        unread = [key for key in weight_map if key not in holder]
        if unread:
            raise ConversionError(f"{index}: {len(unread)} key(s) it lists are in no shard, e.g. {unread[0]} "
                                  f"(said to be in {weight_map[unread[0]]})")
        container = f"{holder[next(iter(weight_map))].container}, {len(files)} shards"
        yield StateDict(index, container, list(holder), lambda k: holder[k].shape(k), lambda k: holder[k].load(k),
                        tuple(index.parent / name for name in files))

_ENCODER_KEY = re.compile(r"(?:^|(?<=\.))(?:image_encoder|vision_encoder)\.")


def _without_prefix(state: StateDict) -> StateDict:
    """`state` with the prefix before its image encoder's keys removed from every key that has it:
    "module." (DistributedDataParallel), "model." (PyTorch Lightning's state_dict of a module held as
    self.model), "sam.", ... Keys outside the prefix stay as they are (and are reported unused)."""
    prefixes = sorted({key[:m.start()] for key in state.keys if (m := _ENCODER_KEY.search(key))})
    if len(prefixes) > 1:
        raise ConversionError(f"{state.file} holds image encoders under several prefixes ({', '.join(repr(p) for p in prefixes)}): "
                              f"save the state dict of the one model to convert")
    if not prefixes or not prefixes[0]:
        return state
    prefix = prefixes[0]
    original = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in state.keys}
    if len(original) < len(state.keys):
        raise ConversionError(f"{state.file}: removing the prefix {prefix!r} makes two keys the same")
    return dataclasses.replace(state, keys=list(original), shape=lambda k: state.shape(original[k]),
                               load=lambda k: state.load(original[k]))


# The image encoder's key prefix tells the formats apart.
_FORMAT_PREFIXES = {"hf": "vision_encoder.", "segment_anything": "image_encoder."}


def detect_format(keys: list[str], path: Path, requested: str = "auto") -> str:
    """The key format of `keys`; `requested` ("auto" or a format) must not contradict them."""
    found = next((fmt for fmt, prefix in _FORMAT_PREFIXES.items() if any(k.startswith(prefix) for k in keys)), None)
    if requested != "auto":
        if found not in (None, requested):
            raise ConversionError(
                f"{path} has {found} keys ({_FORMAT_PREFIXES[found]}*), not {requested} ones "
                f"({_FORMAT_PREFIXES[requested]}*): convert it with format {found!r} (--format {found}) or 'auto'")
        return requested
    if found is None:
        raise ConversionError(
            f"{path}: not a SAM-family state dict (no image_encoder.* or vision_encoder.* keys; first keys: {', '.join(keys[:5])})"
        )
    return found


def _hf_mask_decoder_config(path: Path) -> dict[str, int]:
    """The integer fields of `mask_decoder_config` in a Hugging Face config.json beside the weights
    (num_attention_heads, iou_head_depth, ...: what no tensor's shape tells); {} without one."""
    config_file = path.parent / "config.json"
    try:
        fields = json.loads(config_file.read_text())["mask_decoder_config"]
        return {k: v for k, v in fields.items() if isinstance(v, int) and not isinstance(v, bool)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


# --------------------------------------------------------------------------- mapping keys


@dataclasses.dataclass
class MappedWeights:
    arrays: dict[str, jax.Array]  # Flax path -> float32 array in Flax layout
    sources: dict[str, list[str]]  # Flax path -> the PyTorch key(s) it came from
    unmatched: list[str]  # PyTorch keys no rule matched
    ignored: dict[str, list]  # ignored PyTorch key -> its values (e.g. pixel_mean)
    problems: list[str]  # transform, stacking or duplicate-copy errors


def map_state_dict(state: StateDict, fmt: str) -> MappedWeights:
    """Applies the key map of `fmt` to every key; collects, rather than raises, each problem."""
    rules = [(re.compile(r.pattern), r) for r in KEY_MAPS[fmt]]
    ignored_patterns = [re.compile(p) for p in IGNORED_KEYS[fmt]]
    arrays, sources, unmatched, ignored, problems = {}, collections.defaultdict(list), [], {}, []
    stacks: dict[str, dict[int, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
    for key in state.keys:
        match = rule = None
        for rx, r in rules:
            if m := rx.fullmatch(key):
                match, rule = m, r
                break
        if rule is None:
            if any(p.fullmatch(key) for p in ignored_patterns):
                ignored[key] = state.load(key).reshape(-1).tolist()
            else:
                unmatched.append(key)
            continue
        target = rule.target_for(match)
        try:
            # Straight into a JAX array: one copy per tensor, and Orbax then saves it without another.
            value = jnp.asarray(rule.transform(state.load(key)), dtype=jnp.float32)
        except ConversionError:  # the file itself (damaged tensor data): nothing to collect beside it
            raise
        except ValueError as e:
            problems.append(f"{key} {state.shape(key)}: {e}")
            continue
        if stack := re.fullmatch(r"(.*)\[(\d+)\]", target):
            base, slot = stack[1], int(stack[2])
            if slot in stacks[base]:
                problems.append(f"{key} and {stacks[base][slot][0]} both fill {base}[{slot}]")
            stacks[base][slot] = (key, value)
            continue
        if target in arrays:
            if arrays[target].shape != value.shape or not np.array_equal(arrays[target], value):
                problems.append(f"{key} and {sources[target][0]} are tied copies of {target} but differ")
            sources[target].append(key)
            continue
        arrays[target], sources[target] = value, [key]

    for base, slots in stacks.items():
        keys = [slots[i][0] for i in sorted(slots)]
        if sorted(slots) != list(range(len(slots))):
            problems.append(f"{base}: slots {sorted(slots)} from {', '.join(keys)} are not 0..{len(slots) - 1}")
            continue
        shapes = {slots[i][1].shape for i in slots}
        if len(shapes) > 1:
            problems.append(f"{base}: {', '.join(keys)} have different shapes {sorted(shapes)}")
            continue
        arrays[base] = jnp.stack([slots[i][1] for i in range(len(slots))])
        sources[base] = keys

    # Hugging Face MLPs name their last layer proj_out: it follows the numbered ones.
    last = [t for t in arrays if "/layers_LAST/" in t]
    numbered = collections.Counter()  # MLP path -> number of numbered layers (counted before renaming)
    for t in {(m[1], m[2]) for t in arrays if (m := re.fullmatch(r"(.*)/layers_(\d+)/[^/]+", t))}:
        numbered[t[0]] += 1
    for target in last:
        parent, leaf = target.split("/layers_LAST/")
        final = f"{parent}/layers_{numbered[parent]}/{leaf}"
        arrays[final], sources[final] = arrays.pop(target), sources.pop(target)
    return MappedWeights(arrays, dict(sources), unmatched, ignored, problems)


def _unflatten(arrays: dict[str, jax.Array]) -> dict:
    tree: dict = {}
    for path, value in arrays.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def check_against_model(mapped: MappedWeights, state: StateDict, config: ModelConfig) -> list[str]:
    """Every disagreement between the mapped weights and the model, mis-shaped keys first."""
    expected = expected_shapes(config)
    misshaped, missing, unused = [], [], []
    for target, value in mapped.arrays.items():
        src = ", ".join(f"{k} {state.shape(k)}" for k in mapped.sources[target])
        if target not in expected:
            unused.append(f"unused: {src} (-> {target}, which model {config.name!r} does not have)")
        elif value.shape != expected[target]:
            misshaped.append(
                f"mis-shaped: {src} -> {target} {value.shape}, but model {config.name!r} expects {expected[target]}"
            )
    missing = [f"missing: {t} {shape} (no key in the checkpoint maps to it)" for t, shape in expected.items() if t not in mapped.arrays]
    unused += [f"unused: {k} {state.shape(k)} (no rule in the key map matches it)" for k in mapped.unmatched]
    return misshaped + missing + unused + [f"invalid: {p}" for p in mapped.problems]


def _error_report(path: Path, fmt: str, config_name: str, problems: list[str]) -> str:
    assert problems, "an error report needs a problem"
    counts = collections.Counter(p.split(":", 1)[0] for p in problems)
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    return f"{path} ({fmt} format) does not match model {config_name!r}: {summary}; first: {problems[0]}\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- conversion


def convert_checkpoint(src, dst, format: str = "auto", model: str = "auto", preprocessing: str = "sam",
                       mask_prompt: str = "logits", decoder_heads: Optional[int] = None) -> RadSam:
    """Converts the checkpoint `src` into a RadSAM model checkpoint directory `dst` and returns the model.

    src: a .pth/.pt/.bin (PyTorch), .safetensors file, or a Hugging Face model directory.
    format: "auto" (from the keys), "segment_anything" (SAM, MedSAM) or "hf" (transformers SamModel).
    model: "auto" (the architecture is inferred from the tensor shapes) or a preset name.
    preprocessing: "sam" or "medsam"; the weights cannot tell, and MedSAM was trained on its own
        input pipeline (square resize, min-max to [0, 1], sigmoid threshold), so say so here.
    mask_prompt: "logits" (SAM-family weights: SAM was trained on its previous low-resolution logits
        as the mask prompt) or "binary" (weights trained with RadSAM's binary mask prompts).
    decoder_heads: the mask decoder's attention heads, which no tensor's shape tells; default: a
        Hugging Face config.json's, else SAM's 8 (every released SAM and MedSAM). Inferred models only.
    Raises ConversionError naming the file and, for key problems, every offending key and shape;
    nothing is left at `dst` unless the conversion is complete (a Ctrl-C or SIGTERM while the
    checkpoint is being written takes effect once it is complete).
    """
    dst = Path(dst)
    if dst.exists():
        raise ConversionError(f"destination {dst} already exists; refusing to overwrite it")
    if not dst.absolute().parent.is_dir():
        raise ConversionError(f"destination's parent directory {dst.absolute().parent} does not exist")
    try:  # before the source is read: a read-only or unwritable folder is found at once
        check_output_path(dst, "destination", folder=True)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if preprocessing not in PREPROCESSING_MODES:
        raise ConversionError(f"unknown preprocessing {preprocessing!r}; choose 'sam' or 'medsam'")
    if mask_prompt not in MASK_PROMPT_ENCODINGS:
        raise ConversionError(f"unknown mask_prompt {mask_prompt!r}; choose one of {', '.join(MASK_PROMPT_ENCODINGS)}")
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if decoder_heads is not None and (model not in ("auto", "custom") or decoder_heads < 1):
        raise ConversionError(f"decoder_heads {decoder_heads}: give a positive count, and only with model 'auto' or 'custom' "
                              f"(a preset has its own)")
    preset = None
    if model not in ("auto", "custom"):
        try:
            preset = load_model_config(model)
        except ValueError as e:
            raise ConversionError(str(e)) from e

    with open_state_dict(src) as state:
        fmt = detect_format(state.keys, state.file, format)
        mapped = map_state_dict(state, fmt)
        conflicts = []
        if preset is not None:
            config = preset
        else:
            hf_decoder = _hf_mask_decoder_config(state.file) if fmt == "hf" else {}
            read = hf_decoder.get("num_attention_heads")
            heads = decoder_heads or read or 8
            heads_from = "given" if decoder_heads else "config.json" if read else "assumed: SAM's"
            names = {t: ", ".join(f"{k} {state.shape(k)}" for k in mapped.sources[t]) for t in mapped.arrays}
            try:
                config, conflicts = infer_config_by_majority({k: v.shape for k, v in mapped.arrays.items()},
                                                             decoder_heads=heads, names=names)
            except ArchitectureError as e:
                raise ConversionError(f"{state.file} ({fmt} format): {e}") from e
            depth = hf_decoder.get("iou_head_depth", config.iou_head_depth)
            if depth != config.iou_head_depth:  # a missing middle layer leaves no gap in the keys' numbers
                raise ConversionError(f"{state.file}: its keys give the IoU head {config.iou_head_depth} layers, its "
                                      f"config.json iou_head_depth {depth}: mask_decoder.iou_prediction_head.layers.* "
                                      f"are missing (a partial checkpoint?)")
            near = _preset_of_same_widths(config) if model == "auto" else None
            short = check_against_model(mapped, state, near) if near is not None else []
            if any(p.startswith("missing") for p in short):
                raise ConversionError(_error_report(state.file, fmt, near.name, short) + (
                    f"\n  Its widths are {near.name}'s, but it lacks some of its blocks or layers (a truncated or "
                    f"partial checkpoint?); --model custom converts it as the architecture its keys describe"))
        problems = [f"conflicting: {c}" for c in conflicts] + check_against_model(mapped, state, config)
        if problems:
            raise ConversionError(_error_report(state.file, fmt, config.name, problems))
        config = dataclasses.replace(_with_preprocessing_buffers(config, mapped.ignored), preprocessing=preprocessing,
                                     mask_prompt=mask_prompt)
        metadata = {
            "source_file": state.file.name,
            "source_sha256": state.sha256(),
            "source_format": fmt,
            "source_container": state.container,
            "model_inferred": preset is None,
            **({"decoder_heads_from": heads_from} if preset is None else {}),
            "converter": "radsam-jax convert",
        }
        if mapped.ignored:
            metadata["ignored_keys"] = mapped.ignored
        variables = _unflatten(mapped.arrays)
        del mapped
        with signals_held(signal.SIGINT, signal.SIGTERM):
            save_model(dst, config, variables, metadata)
    return RadSam(config, variables, metadata=metadata)


def _preset_of_same_widths(config: ModelConfig) -> Optional[ModelConfig]:
    """The preset (vit_b/l/h, small) whose encoder and prompt widths and input size `config` has, if
    `config` is not that preset: an inferred "custom" model of SAM ViT-B's widths with 11 blocks."""
    if config.name != "custom":
        return None
    for name in MODELS[2:]:
        preset = load_model_config(name)
        if (preset.encoder_dim, preset.prompt_embed_dim, preset.image_size) == (
                config.encoder_dim, config.prompt_embed_dim, config.image_size):
            return preset
    return None


def _with_preprocessing_buffers(config: ModelConfig, ignored: dict[str, list]) -> ModelConfig:
    """Takes pixel_mean / pixel_std buffers into the config, scaled to 0..255 like SAM's."""
    changes = {}
    for field in ("pixel_mean", "pixel_std"):
        values = next((v for k, v in ignored.items() if k.endswith(field)), None)
        if values is not None and len(values) == 3:
            values = tuple(float(v) for v in values)
            if not np.allclose(values, getattr(config, field)):
                changes[field] = values
    return dataclasses.replace(config, **changes) if changes else config
