"""RadSAM training: loss, optimiser, sharded train step, Orbax checkpointing and the training loop.

Where to look:
- `loss.py`: `radsam_loss` (soft Dice + BCE on the primary mask, best-of-3 secondary masks, IoU MSE).
- `optimizer.py`: `make_optimizer` (Adam, schedule, clipping, trainable-parameter regexes).
- `state.py`: `TrainState` (params, buffers, optimiser state, step, RNG, dynamic loss scale).
- `train_step.py`: `make_train_step` / `make_eval_step` / `create_sharded_state` (the jitted sharded step).
- `checkpointing.py`: `Checkpointer` (Orbax manager with the Grain iterator state) and the SIGTERM hook.
- `loop.py`: `train_and_evaluate(config, workdir)`.
- `volume_validation.py`: `volume_validation` (the benchmark's 3D Dice on a few validation volumes).
- `cli.py`: `radsam train` (`add_parser`, `run`) with `--config.key=value` overrides.
- `config_lib.py`: `base_config` and the config-file helpers (`file.py:variant`, overrides, paths).
- `mixture.py`: several datasets sampled with weights; `synthetic.py`: generated data for tests.
- `export.py`: `radsam export` (a training checkpoint -> a model directory for inference).
"""
