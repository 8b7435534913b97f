"""Joint RadSAM training on AMOS + TotalSegmentator.

Each dataset has its own data-pipeline config under `datasets`; `data_mixture` gives (name, weight)
pairs, and every training batch is drawn from one dataset with those probabilities
(radsam_jax.train.mixture.MixedIterator, checkpointed with the model). Validation uses `data` (AMOS).

Run length: `num_epochs` is given to each dataset's iterator separately, and training ends as soon as
one of them runs out. With 50/50 batches that is the dataset with fewer batches per epoch (AMOS
here): the run does `num_epochs` epochs of AMOS and draws about as many TotalSegmentator batches,
far fewer than `num_epochs` epochs of TotalSegmentator. MixedIterator has no other stopping rule; for
a fixed length instead, set num_epochs = -1 (every dataset repeats) and num_train_steps.
"""

import ml_collections

from radsam_jax.train.config_lib import base_config, config_variant, pipeline_data_config, shrink_to_smoke_run


def get_config(arg: str = ""):
    variant = config_variant(arg)  # "runlocal": a 20-step smoke run of this recipe on a CPU
    c = base_config()
    c.model.name = "vit_b"  # architecture when init_checkpoint is empty
    c.init_checkpoint = "checkpoints/sam_vit_b.radsam"  # converted SAM ViT-B; relative = repo-relative
    c.precision = "bfloat16"  # bf16 compute, f32 params
    c.batch_size = 32  # 16 devices x 2
    c.num_epochs = 7  # epochs of each dataset's iterator; the run ends when the first runs out (AMOS): see above
    c.optim.learning_rate = 1e-5  # Adam, constant
    c.data_source = "mixture"  # mix the `datasets` below with `data_mixture` weights
    c.datasets = ml_collections.ConfigDict()
    c.datasets.amos = pipeline_data_config(format="amos", root="", modality="CT", num_workers=4)  # AMOS CT
    c.datasets.totalseg = pipeline_data_config(format="totalsegmentator", root="", num_workers=4)  # TotalSegmentator
    c.data_mixture = (("amos", 0.5), ("totalseg", 0.5))  # (dataset, sampling weight) pairs
    c.data = c.datasets.amos  # validation data (AMOS imagesVa), as in the paper's tables
    c.eval.split = "val"  # AMOS validation
    c.eval.every_steps = 5000  # validate every 5000 steps
    c.eval.volume_cases = 4  # and score 4 AMOS validation volumes in 3D (one box, mask propagation)
    c.checkpoint.every_steps = 5000  # save every 5000 steps
    return shrink_to_smoke_run(c) if variant == "runlocal" else c
