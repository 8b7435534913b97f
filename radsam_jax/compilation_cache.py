"""JAX's persistent compilation cache for the command-line tools.

A ViT-B encoder takes tens of seconds to compile on a CPU (and several on a GPU); the cache keeps
compiled executables on disk so the second `radsam ...` run of the same shapes starts at once.
Call `enable_compilation_cache()` once at start-up, before the first jit compiles.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import jax

DISABLE_ENV = "RADSAM_NO_COMPILATION_CACHE"
DIR_ENV = "RADSAM_COMPILATION_CACHE_DIR"
DEFAULT_DIR = Path("~/.cache/radsam-jax/xla")


def enable_compilation_cache(cache_dir: Optional[os.PathLike] = None) -> Optional[Path]:
    """Points JAX's persistent cache at `cache_dir` (default $RADSAM_COMPILATION_CACHE_DIR, else
    ~/.cache/radsam-jax/xla) and returns it; returns None and changes nothing when
    $RADSAM_NO_COMPILATION_CACHE is set (to anything but "" or "0") or the directory cannot be created.
    Only programs that took a second or more to compile are written: small jitted helpers recompile
    faster than they load.
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    path = Path(cache_dir or os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home must not stop inference
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
