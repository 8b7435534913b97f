"""Fine-tunes the bundled small RadSAM (configs/train/example_cpu.py, 3500 steps) so it follows
correction clicks given with a mask prompt: the evaluation showed it honours 13-17 % of such clicks,
having seen mask + points in 10 % of its training prompts. Same data and augmentation; the
mixture moves to mask + correction points, at a lower learning rate. Result (MODEL_CARD.md, "Tried:
fine-tuning toward clicks"): no change beyond the bootstrap intervals; not adopted.

    radsam train --config configs/train/example_cpu_clicks.py --workdir runs/small_clicks
"""

from pathlib import Path

from radsam_jax.train.config_lib import config_variant, load_config_file


def get_config(arg: str = ""):
    config_variant(arg, ())  # none: example_cpu.py's runlocal shrinks the model that init_checkpoint fixes
    c = load_config_file(str(Path(__file__).with_name("example_cpu.py")))
    c.init_checkpoint = "radsam_jax/assets/default_checkpoint"  # the bundled model (repo-relative)
    c.num_train_steps = 800  # ~20 min on the 2-core CPU
    c.optim.learning_rate = 1e-4  # fine-tuning: a quarter of the from-scratch rate
    c.optim.warmup_steps = 50  # linear warm-up from 0
    c.data.prompts.mixture.update(dict(point=0.2, box=0.25, mask=0.05, mask_points=0.4, box_mask=0.1))
    c.eval.every_steps = 400  # validate twice, and before the first step
    c.eval.at_start = True  # the bundled model's validation loss, the baseline
    return c
