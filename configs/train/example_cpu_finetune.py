"""The bundled small RadSAM (configs/train/example_cpu.py, 3500 steps, exported to
radsam_jax/assets/default_checkpoint) trained further from its weights: the same data, augmentation and
loss (Adam's moments are not exported: they restart from zero), validated before the first step as the
baseline. Both recipes were tried and not adopted (MODEL_CARD.md):

    radsam train --config configs/train/example_cpu_finetune.py --workdir runs/small_longer
    radsam train --config configs/train/example_cpu_finetune.py:clicks --workdir runs/small_clicks

- default ("Tried: a longer run"): its held-out validation Dice was still rising at the last step, so
  2500 more steps of the same mixture, a warm restart from half the first run's peak rate. The training
  patient fits better, the held-out one does not.
- `clicks` ("Tried: fine-tuning toward clicks"): the evaluation showed the model honours 13-17 % of
  correction clicks given with a mask prompt, having seen mask + points in 10 % of its training prompts;
  800 steps with the mixture moved to mask + correction points, at a quarter of the first run's peak rate.
  No change beyond the bootstrap intervals.
"""

from pathlib import Path

from radsam_jax.train.config_lib import config_variant, load_config_file


def get_config(arg: str = ""):
    # No runlocal: example_cpu.py's shrinks the architecture that init_checkpoint fixes.
    clicks = config_variant(arg, ("clicks",)) == "clicks"
    c = load_config_file(str(Path(__file__).with_name("example_cpu.py")))
    c.init_checkpoint = "radsam_jax/assets/default_checkpoint"  # the bundled model (repo-relative)
    c.eval.at_start = True  # the bundled model's validation, the baseline
    c.num_train_steps = 2500  # ~65 min on the 2-core CPU
    c.optim.learning_rate = 2e-4  # half the first run's peak
    c.optim.warmup_steps = 100  # linear warm-up from 0 while Adam's moments fill
    if clicks:
        c.num_train_steps = 800  # ~20 min
        c.optim.learning_rate = 1e-4  # a quarter of the from-scratch rate
        c.optim.warmup_steps = 50  # linear warm-up from 0
        c.data.prompts.mixture.update(dict(point=0.2, box=0.25, mask=0.05, mask_points=0.4, box_mask=0.1))
        c.eval.every_steps = 400  # validate twice
    return c
