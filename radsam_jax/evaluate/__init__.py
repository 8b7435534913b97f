"""The RadSAM benchmark (`radsam evaluate`): simulated user, 3D Dice with bootstrap CIs, reports."""

from radsam_jax.evaluate.metrics import bootstrap_ci, dice, normal_ci, oracle_dice
from radsam_jax.evaluate.runner import EvalOptions, Setting, evaluate_cases, make_settings

__all__ = ["EvalOptions", "Setting", "bootstrap_ci", "dice", "evaluate_cases", "make_settings", "normal_ci", "oracle_dice"]
