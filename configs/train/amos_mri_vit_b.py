"""RadSAM on the MRI part of AMOS (cases > 500): the amos_vit_b recipe (SAM ViT-B, Adam constant 1e-5,
global batch 32, 7 epochs) with MR intensities. MR values have no absolute scale, so each volume is
normalised by its own 0.5th / 99.5th percentiles (of voxels above 0) to 0..1000 and windowed at
500/1000: MedSAM's MR normalisation (radsam_jax/intensity.py). The paper trains and evaluates on AMOS
CT only; this config is an extension, and the exported model records the percentile intensity, so
`radsam segment` and `radsam evaluate --modality MRI` normalise MR volumes the same way.

    radsam train --config configs/train/amos_mri_vit_b.py --workdir runs/amos_mri_vit_b \\
        --config.init_checkpoint=checkpoints/sam_vit_b.radsam --config.data.root=/data/amos22
"""

from pathlib import Path

from radsam_jax.train.config_lib import load_config_file


def get_config(arg: str = ""):
    c = load_config_file(str(Path(__file__).with_name("amos_vit_b.py")), arg or None)
    c.data.modality = "MRI"  # cases > 500
    c.data.intensity = "percentile"  # each volume's p0.5..p99.5 (voxels > 0) -> 0..1000
    c.data.window_level = 500.0  # window centre: the middle of that range
    c.data.window_width = 1000.0  # window width: the whole range, mapped to 0..255
    c.eval.every_steps = 500  # far fewer MR scans than CT in AMOS, so fewer steps per epoch: validate more often
    c.checkpoint.every_steps = 500  # and save more often
    return c
