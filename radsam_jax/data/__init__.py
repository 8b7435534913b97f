"""Training data: dataset layouts, prompt simulation, augmentation and the Grain pipeline.

Import the submodules directly (`from radsam_jax.data import pipeline`); this package stays light so
Grain worker processes only load what they use.
"""
