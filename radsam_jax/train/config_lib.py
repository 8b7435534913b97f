"""Loading `configs/train/*.py` files and applying `--config.key=value` overrides.

Like `ml_collections.config_flags`, but with plain argparse: the value is parsed with the type of
the existing field (bool accepts true/false/1/0/yes/no, tuples and lists take Python literals or
comma-separated values, None-valued fields take a Python literal), and a key that does not exist is
an error that lists the closest existing keys.
"""

import ast
import difflib
import importlib.util
import pathlib
from typing import Any, Iterable, Optional, Sequence

import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A bad config file, key or value; the message says which and what would be valid."""


def split_config_spec(spec: str) -> tuple[str, Optional[str]]:
    """`file.py:arg` -> ("file.py", "arg"); a spec without ":" or naming an existing file -> (spec, None).
    The last ":" splits, so a directory with ":" in its name still works."""
    if ":" in spec and not pathlib.Path(spec).exists():
        path, arg = spec.rsplit(":", 1)
        return path, arg
    return spec, None


def load_config_file(spec: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()` (or `get_config(arg)` for `file.py:arg`, or
    for an `arg` given here: a config file building on another one's variant)."""
    path, arg = split_config_spec(spec) if arg is None else (spec, arg)
    file = pathlib.Path(path)
    if not file.exists():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_radsam_train_config_{file.stem}", file)
    if file.is_dir() or file.suffix != ".py" or spec is None:
        raise ConfigError(f"config file {path} is not a Python file (configs/train/*.py)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config()")
    config = module.get_config(arg) if arg is not None else module.get_config()
    return config


def config_variant(arg: Optional[str], variants: Sequence[str] = ("runlocal",)) -> str:
    """The variant a config file was asked for (`file.py:VARIANT`; "" for none): a ConfigError for one
    the file does not offer, rather than the full recipe for a mistyped `runlocal`."""
    arg = arg or ""
    if arg and arg not in variants:
        raise ConfigError(f"config variant {arg!r} is not one of this file's: {', '.join(variants)}")
    return arg


def shrink_to_smoke_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`runlocal` of a full-scale recipe: the CPU-sized model from scratch, 20 steps of batch 2 in float32,
    data read in-process (every dataset of a mixture too), to try the recipe's data and code on a laptop."""
    c.model.name = "small"  # the CPU-sized model
    c.init_checkpoint = ""  # from scratch
    c.precision = "float32"  # CPUs have no fast bf16
    c.batch_size = 2  # one CPU
    c.num_train_steps = 20  # a smoke run
    for data in [c.data, *c.get("datasets", {}).values()]:
        data.num_workers = 0  # in-process loading
    return c


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        name = f"{prefix}{k}"
        keys.append(name)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(flat_keys(v, name + "."))
    return keys


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_value(text: str, current: Any) -> Any:
    """`text` converted to the type of the field's current value."""
    if isinstance(current, bool):
        return _parse_bool(text)
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [t for t in (p.strip() for p in text.split(",")) if t]
        if not isinstance(value, (tuple, list)):
            value = [value]
        if current:
            value = [parse_value(str(v), current[0]) if not isinstance(v, type(current[0])) else v for v in value]
        return type(current)(value)
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ConfigError(f"cannot override a field of type {type(current).__name__} from the command line")


# Paths that `resolve_path` takes relative to the repository when they are used, so that a config file
# can name a checkpoint inside it; given on the command line they are relative to the current folder
# like every other path there (data.root, ...), and are made absolute when the override is applied.
REPO_RELATIVE_KEYS = ("init_checkpoint", "compilation_cache_dir")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets the dotted `key` of `config` from the command-line text `text`, parsed as the type it has."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        is_last = i == len(parts) - 1
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            keys = flat_keys(config)
            close = difflib.get_close_matches(key, keys, n=5, cutoff=0.5)
            # Also suggest by the last component, e.g. "lr" -> "optim.learning_rate" fails but
            # "learning_rate" -> "optim.learning_rate" is found.
            close += [k for k in keys if k.split(".")[-1] == parts[-1] and k not in close]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"config has no key {key!r}{hint}")
        if is_last:
            current = node[part]
            if isinstance(current, ml_collections.ConfigDict):
                raise ConfigError(f"{key!r} is a section, not a value; its keys: {', '.join(sorted(current.keys()))}")
            try:
                value = parse_value(text, current)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"bad value for {key} (a {type(current).__name__}): {text!r}: {e}") from e
            if key in REPO_RELATIVE_KEYS and value:
                value = str(pathlib.Path(value).expanduser().absolute())
            with node.ignore_type():
                node[part] = value
        else:
            node = node[part]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies "key=value" strings (keys dotted, e.g. "optim.learning_rate=1e-4") in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        apply_override(config, key.strip(), text)
    return config


def resolve_path(path: str) -> str:
    """A relative path in a config is relative to the repository root (so `../shared` works from CI)."""
    if not path:
        return path
    p = pathlib.Path(path).expanduser()
    return str(p if p.is_absolute() else (REPO_ROOT / p).resolve())


def pipeline_data_config(**values) -> ml_collections.ConfigDict:
    """The data pipeline's `default_data_config()` with `values` set (each must be an existing key)."""
    from radsam_jax.data.pipeline import default_data_config

    data = default_data_config()
    for key, value in values.items():
        if key not in data:
            close = difflib.get_close_matches(key, list(data.keys()), n=5, cutoff=0.5)
            raise ConfigError(f"data config has no key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        with data.ignore_type():
            data[key] = value
    return data


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every configs/train/*.py file (the paper's recipe where it has one)."""
    c = ml_collections.ConfigDict()
    # ---- model
    c.model = ml_collections.ConfigDict()
    c.model.name = "vit_b"  # preset configs/<name>.py used when init_checkpoint is empty
    # Optional architecture overrides of the preset (None = the preset's value); for tiny test models. With an
    # init_checkpoint its weights fix them: a value other than its own is a config error.
    c.model.image_size = None  # model input side S
    c.model.encoder_dim = None  # ViT width
    c.model.encoder_depth = None  # number of ViT blocks
    c.model.encoder_heads = None  # ViT attention heads
    c.model.window_size = None  # local attention window side (tokens)
    c.model.global_attn_indexes = None  # blocks with global attention
    c.model.prompt_embed_dim = None  # prompt / decoder width
    c.model.decoder_heads = None  # decoder attention heads
    c.model.decoder_mlp_dim = None  # decoder MLP width
    c.model.iou_head_hidden_dim = None  # IoU head width
    c.init_checkpoint = ""  # converted SAM/MedSAM checkpoint to start from ("" = none); relative to: config file, repo; CLI, cwd
    c.precision = "float32"  # "float32", "bfloat16" (bf16 compute, f32 params) or "float16" (dynamic loss scaling)
    c.attention = "chunked"  # encoder attention: "chunked", "auto" (cuDNN fused on GPUs in bf16/fp16), "fused", "materialized"
    c.remat = False  # rematerialise encoder blocks: less activation memory, more compute (CPU: only with XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false)
    # ---- run length, batch, seed
    c.seed = 0  # model init, data order, augmentation and prompt simulation
    c.batch_size = 32  # global batch over all devices and processes (paper: batch size 2 on 16 GPUs, read as 2 per GPU)
    c.grad_accum_steps = 1  # run each batch as this many microbatches, one update (memory / k; batch_size unchanged)
    c.num_epochs = 7  # passes over the training slices (paper: 7); -1 = repeat forever
    c.num_train_steps = -1  # stop after this many steps (-1 = when the epochs are done)
    c.num_devices = -1  # devices in the mesh (-1 = all of them)
    c.distributed = False  # call jax.distributed.initialize() first (multi-host); env RADSAM_DISTRIBUTED=1 too
    # Explicit multi-host topology (docs/multihost.md); unset = env RADSAM_COORDINATOR_ADDRESS /
    # RADSAM_NUM_PROCESSES / RADSAM_PROCESS_ID, else JAX auto-detects (Slurm, TPU pod, K8s, Open MPI).
    c.distributed_coordinator_address = ""  # "host:port" of process 0; setting it implies distributed
    c.distributed_num_processes = -1  # processes in the job (-1 = env or auto-detect)
    c.distributed_process_id = -1  # this process's id in 0..num_processes-1 (-1 = env or auto-detect)
    # ---- optimiser
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5  # peak learning rate (paper: constant 1e-5)
    c.optim.schedule = "constant"  # "constant" or "cosine" (cosine needs num_train_steps)
    c.optim.warmup_steps = 0  # linear warm-up steps from 0 to learning_rate
    c.optim.min_lr = 0.0  # final learning rate of the cosine decay
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.0  # > 0 switches Adam to AdamW with this decoupled decay
    c.optim.grad_clip_norm = 0.0  # clip gradients to this global norm (0 = no clipping)
    c.optim.trainable = (".*",)  # regexes (fullmatch) of parameter paths to train, e.g. "mask_decoder/.*"
    c.optim.frozen = ()  # regexes of parameter paths to freeze, e.g. "image_encoder/.*"
    # ---- loss (see radsam_jax/train/loss.py)
    c.loss = ml_collections.ConfigDict()
    c.loss.primary_weight = 1.0  # weight of Dice + BCE on the primary mask
    c.loss.secondary_weight = 1.0  # weight of the best-of-3 secondary masks' Dice + BCE
    c.loss.iou_weight = 1.0  # weight of the IoU-prediction MSE
    c.loss.dice = "squared"  # soft Dice denominator: "squared" (V-Net, the paper's [11]) or "linear" (sum p + sum g)
    c.loss_scale = ml_collections.ConfigDict()
    c.loss_scale.initial = 2.0**15  # float16 only: initial dynamic loss scale
    c.loss_scale.period = 2000  # float16 only: finite steps before the scale doubles
    c.loss_scale.factor = 2.0  # float16 only: growth / shrink factor
    # ---- data
    c.data_source = "pipeline"  # "pipeline" (radsam_jax.data.pipeline on `data`), "mixture" (`datasets`, `data_mixture`) or "synthetic" (ellipses)
    c.data = pipeline_data_config()  # the data pipeline's config (dataset layout, paths, augmentation, prompts)
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.num_train = 256  # synthetic source: training examples per epoch
    c.synthetic.num_validation = 32  # synthetic source: held-out examples
    # ---- validation
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "val"  # split name of the held-out slices
    c.eval.every_steps = 1000  # validate every this many steps (and at the end); <= 0: only at the end
    c.eval.batch_size = -1  # global eval batch (-1 = batch_size)
    # Pipeline data: a validation reads min(data.val_max_samples, max_batches x eval batch) slices (a cap
    # <= 0 is no cap; both <= 0: the whole split), spread evenly over the split. Synthetic: max_batches only.
    c.eval.max_batches = 50  # cap on validation batches per evaluation (<= 0: no cap)
    c.eval.at_start = False  # also validate before the first step (the baseline for "did it learn")
    # Volume validation (train/volume_validation.py): the paper's 3D Dice from one box, propagated.
    c.eval.volume_cases = 0  # validation volumes scored in 3D at each validation (pipeline data; 0 = off)
    c.eval.volume_min_slices = 1  # objects spanning fewer slices are not scored (the benchmark's --min-slices)
    # ---- logging and checkpoints
    c.log_every_steps = 50  # metrics.jsonl / TensorBoard / progress line every this many steps (<= 0: last step only)
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # save every this many steps (and at the end, and on SIGTERM)
    c.checkpoint.max_to_keep = 3  # keep the last N checkpoints
    c.checkpoint.async_save = True  # write checkpoints in a background thread
    c.compilation_cache_dir = ""  # persistent XLA compilation cache folder ("" = the `radsam` command's: ~/.cache/radsam-jax/xla or RADSAM_COMPILATION_CACHE_DIR); relative: as init_checkpoint
    return c
