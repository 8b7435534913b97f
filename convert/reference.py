"""PyTorch segment_anything as a reference outside the tests (benchmarks): import, build, convert.

Besides tests/, this is the only runtime-adjacent place that imports torch (the package itself never
does). segment_anything/__init__.py imports torchvision for a resize helper the model code does not
use, and PyPI's torchvision does not import beside the CPU torch installed here, so
`import_segment_anything` registers an empty package module `segment_anything` carrying the real
`__path__` and imports `segment_anything.build_sam` / `segment_anything.modeling` directly.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


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


def build_torch_sam(name: str = "vit_b", checkpoint=None):
    """segment_anything's `sam_model_registry[name]` in eval mode (random init when checkpoint is None)."""
    sam_model_registry, _ = import_segment_anything()
    return sam_model_registry[name](checkpoint=None if checkpoint is None else str(checkpoint)).eval()


def random_reference_checkpoint(workdir, name: str = "vit_b", seed: int = 0) -> tuple[Path, Path]:
    """Saves a randomly initialised segment_anything model to workdir/sam_<name>.pth and converts it
    with the project's converter into workdir/radsam_<name>; returns (pth, converted_dir).

    Both sides of a comparison then load the *same* weights: PyTorch from the .pth, JAX from the
    converted checkpoint (`radsam_jax.checkpoint.load_checkpoint`).
    """
    import torch

    from radsam_jax.convert.convert import convert_checkpoint

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pth, dst = workdir / f"sam_{name}.pth", workdir / f"radsam_{name}"
    if not pth.exists():
        torch.manual_seed(seed)
        torch.save(build_torch_sam(name).state_dict(), pth)
    if not dst.exists():
        convert_checkpoint(pth, dst, model=name)
    return pth, dst
