"""Joint RadSAM training on AMOS + TotalSegmentator, two datasets mixed in every epoch.

Each dataset has its own data-pipeline config under `datasets`; `data_mixture` gives (name, weight)
pairs, and every training batch is drawn from one dataset with those probabilities
(radsam_jax.train.mixture.MixedIterator, checkpointed with the model). Validation uses `data` (AMOS).
"""

import ml_collections

from radsam_jax.train.config_lib import base_config, pipeline_data_config


def get_config(arg: str = ""):
    c = base_config()
    c.model.name = "vit_b"  # architecture when init_checkpoint is empty
    c.init_checkpoint = "checkpoints/sam_vit_b.radsam"  # converted SAM ViT-B; relative = repo-relative
    c.precision = "bfloat16"  # bf16 compute, f32 params
    c.batch_size = 32  # 16 devices x 2
    c.num_epochs = 7  # epochs of the mixture
    c.optim.learning_rate = 1e-5  # Adam, constant
    c.data_source = "mixture"  # mix the `datasets` below with `data_mixture` weights
    c.datasets = ml_collections.ConfigDict()
    c.datasets.amos = pipeline_data_config(format="amos", root="", modality="CT", num_workers=4)  # AMOS CT
    c.datasets.totalseg = pipeline_data_config(format="totalsegmentator", root="", num_workers=4)  # TotalSegmentator
    c.data_mixture = (("amos", 0.5), ("totalseg", 0.5))  # (dataset, sampling weight) pairs
    c.data = c.datasets.amos  # validation data (AMOS imagesVa), as in the paper's tables
    c.eval.split = "val"  # AMOS validation
    c.eval.every_steps = 5000  # validate every 5000 steps
    c.checkpoint.every_steps = 5000  # save every 5000 steps
    return c
