"""Continues the bundled small RadSAM (configs/train/example_cpu.py, 3500 steps) for 2500 more steps
of the same recipe: its held-out validation Dice was still rising at the last step (MODEL_CARD.md),
so a longer run is the cheapest check of what more training buys. A warm restart: the weights start
from the export (the optimiser state is not exported), a short warm-up, then a second cosine decay
from half the first run's peak rate. Same data, mixture, augmentation and loss. Result (MODEL_CARD.md,
"Tried: a longer run"): the training patient fits better, the held-out one does not; not adopted.

    radsam train --config configs/train/example_cpu_continue.py --workdir runs/small_continue
"""

from pathlib import Path

from radsam_jax.train.config_lib import config_variant, load_config_file


def get_config(arg: str = ""):
    config_variant(arg, ())  # none: example_cpu.py's runlocal shrinks the model that init_checkpoint fixes
    c = load_config_file(str(Path(__file__).with_name("example_cpu.py")))
    c.init_checkpoint = "radsam_jax/assets/default_checkpoint"  # the bundled model (repo-relative)
    c.num_train_steps = 2500  # ~65 min on the 2-core CPU
    c.optim.learning_rate = 2e-4  # half the first run's peak: Adam's moments restart from zero
    c.optim.warmup_steps = 100  # linear warm-up from 0 while the moments fill
    c.eval.at_start = True  # the bundled model's validation Dice, the baseline
    return c
