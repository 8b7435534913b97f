"""RadSAM on TotalSegmentator (CT, one folder per subject, split from meta.csv): same recipe as
amos_vit_b (SAM ViT-B, Adam constant 1e-5, global batch 32, 7 epochs).

    radsam train --config configs/train/totalseg_vit_b.py --workdir runs/totalseg_vit_b \\
        --config.data.root=/data/Totalsegmentator_dataset_v201
"""

from radsam_jax.train.config_lib import base_config, config_variant, pipeline_data_config, shrink_to_smoke_run


def get_config(arg: str = ""):
    variant = config_variant(arg)  # "runlocal": a 20-step smoke run of this recipe on a CPU
    c = base_config()
    c.model.name = "vit_b"  # architecture when init_checkpoint is empty
    c.init_checkpoint = "checkpoints/sam_vit_b.radsam"  # converted SAM ViT-B; relative = repo-relative
    c.precision = "bfloat16"  # bf16 compute, f32 params
    c.batch_size = 32  # 16 devices x 2
    c.num_epochs = 7  # as the paper's AMOS run
    c.optim.learning_rate = 1e-5  # Adam, constant
    c.data_source = "pipeline"  # radsam_jax.data.pipeline
    c.data = pipeline_data_config(
        format="totalsegmentator",  # sXXXX/ct.nii.gz + segmentations/<structure>.nii.gz
        root="",  # dataset folder: set with --config.data.root
        num_workers=8,  # 117 structure files per subject: decoding is the bottleneck
        cache_size=2,  # decoded subjects kept per worker
        cases_per_block=2,  # samples shuffled within blocks of 2 subjects, which the cache holds
    )
    c.eval.split = "val"  # meta.csv split "val"
    c.eval.every_steps = 5000  # validate every 5000 steps
    c.eval.volume_cases = 4  # and score 4 validation volumes in 3D (one box, mask propagation), the paper's metric
    c.checkpoint.every_steps = 5000  # save every 5000 steps
    return shrink_to_smoke_run(c) if variant == "runlocal" else c
