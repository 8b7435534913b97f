"""PyTorch segment_anything as a reference outside the tests (benchmarks): import, build, convert.

The package radsam_jax never imports torch; convert.py does to read .pth files, this module to build
SAM models for parity checks and benchmarks. segment_anything/__init__.py imports torchvision for a resize helper the model code does not
use, and PyPI's torchvision does not import beside the CPU torch installed here, so
`import_segment_anything` registers an empty package module `segment_anything` carrying the real
`__path__` and imports `segment_anything.build_sam` / `segment_anything.modeling` directly.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np


def import_segment_anything():
    """(sam_model_registry, modeling) without running segment_anything/__init__.py (see module doc)."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None:
            raise ImportError("segment_anything is not installed (pip install segment-anything)")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    from segment_anything import modeling
    from segment_anything.build_sam import sam_model_registry

    return sam_model_registry, modeling


def randomize_(module, seed: int = 0):
    """Fills every parameter and persistent buffer with random values of a sensible scale, in place.

    SAM initialises rel-pos tables and pos_embed to zeros (and LayerNorms to 1/0), which would leave
    those code paths untested; random values make every tensor matter for the outputs.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    persistent = set(module.state_dict())
    embeddings = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name not in persistent:  # segment_anything's pixel_mean / pixel_std
                continue
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if "rel_pos" in leaf:
                value = 0.2 * noise
            elif "pos_embed" in leaf:
                value = 0.5 * noise
            elif "positional" in name:  # the random-Fourier matrix (SAM draws it N(0, 1))
                value = noise
            elif leaf == "bias":
                value = 0.1 * noise
            elif t.ndim == 1:  # LayerNorm scale
                value = 1.0 + 0.2 * noise
            elif name in embeddings:  # nn.Embedding tables: N(0, 1) as PyTorch initialises them
                value = noise
            else:  # linear / conv kernels: unit-variance outputs
                fan_in = t.shape[0] if "upscal" in name else int(np.prod(t.shape[1:]))
                value = noise / np.sqrt(fan_in)
            t.copy_(value.to(t.dtype))
    return module


def build_torch_sam(name: str = "vit_b", checkpoint=None):
    """segment_anything's `sam_model_registry[name]` in eval mode (random init when checkpoint is None)."""
    sam_model_registry, _ = import_segment_anything()
    return sam_model_registry[name](checkpoint=None if checkpoint is None else str(checkpoint)).eval()


def random_reference_checkpoint(workdir, name: str = "vit_b", seed: int = 0) -> tuple[Path, Path]:
    """Saves a randomly initialised segment_anything model to workdir/sam_<name>.pth and converts it
    with the project's converter into workdir/radsam_<name>; returns (pth, converted_dir).

    Both sides of a comparison then load the *same* weights: PyTorch from the .pth, JAX from the
    converted checkpoint (`radsam_jax.checkpoint.load_checkpoint`); random rel-pos tables and
    position embeddings (`randomize_`), so that the comparison covers them.
    """
    import torch

    from radsam_jax.convert.convert import convert_checkpoint

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pth, dst = workdir / f"sam_{name}.pth", workdir / f"radsam_{name}"
    if not pth.exists():
        torch.manual_seed(seed)
        torch.save(randomize_(build_torch_sam(name), seed).state_dict(), pth)
    if not dst.exists():
        convert_checkpoint(pth, dst, model=name)
    return pth, dst
