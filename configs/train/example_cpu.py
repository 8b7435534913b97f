"""The small RadSAM trained from scratch on this CPU: ct-abdomen-3mm (generic layout) for training,
validated on held-out slices of another patient and scanner (ct-thorax-abdomen-dicom).

    radsam train --config configs/train/example_cpu.py --workdir /tmp/radsam_example
    radsam train --config configs/train/example_cpu.py:runlocal --workdir /tmp/radsam_tiny  # a few minutes

Paths are relative to the repository root (resolved by radsam_jax.train.config_lib), so CI finds
`../shared/data` beside the checkout. `runlocal` shrinks the model (64 px input, 2 ViT blocks),
the run and the validation set for smoke tests.
"""

from radsam_jax.train.config_lib import base_config, config_variant, pipeline_data_config, resolve_path

DATA = "../shared/data"
SMOKE_STRUCTURES = ("liver", "spleen", "stomach", "aorta", "inferior_vena_cava")  # runlocal only


def get_config(arg: str = ""):
    runlocal = config_variant(arg) == "runlocal"
    c = base_config()
    c.model.name = "small"  # configs/small.py: 256 px input, 6 ViT blocks of width 192, 3.8 M params
    c.init_checkpoint = ""  # from scratch
    c.batch_size = 8  # global batch (one CPU device)
    c.num_epochs = -1  # repeat the single training volume; the run length is num_train_steps
    c.num_train_steps = 3500  # 84-90 min on this 2-core CPU at 5.2-5.7 images/s: the bundled checkpoint (MODEL_CARD.md)
    c.optim.learning_rate = 4e-4  # from scratch a tiny model needs far more than the paper's fine-tuning 1e-5
    c.optim.schedule = "cosine"  # decay to min_lr by the last step
    c.optim.min_lr = 1e-5  # final learning rate
    c.optim.warmup_steps = 100  # linear warm-up from 0
    c.optim.grad_clip_norm = 1.0  # clip the global gradient norm
    c.data_source = "pipeline"  # radsam_jax.data.pipeline
    c.data = pipeline_data_config(
        format="generic",  # labels.json per case folder
        root=resolve_path(f"{DATA}/ct-abdomen-3mm"),  # training volume (3 mm, NIfTI)
        val_root=resolve_path(f"{DATA}/ct-thorax-abdomen-dicom"),  # held-out volume (DICOM, other patient)
        structures=(),  # every labelled structure (about 60 in the training volume): more shapes to learn from
        val_max_samples=64,  # held-out slices per validation
        read_threads=1,  # this CPU has 2 cores shared with the model
        prefetch_buffer_size=2,  # batches read ahead
    )
    c.eval.split = "val"  # the val_root volume
    # A box or point alone must be learned from the image; a mask prompt is easy to copy. A model trained
    # on the uniform mixture learns the copy first and keeps returning empty masks for boxes and points.
    c.data.prompts.mixture.update(dict(point=0.3, box=0.4, mask=0.1, mask_points=0.1, box_mask=0.1,
                                       box_mask_points=0.0))
    # The bundled checkpoint's recipe predates the box + mask + points type, up to 11 clicks and V-Net's
    # squared soft Dice (the defaults now); these three keep its recipe (MODEL_CARD.md).
    c.data.prompts.num_points = 4  # correction prompts draw 1..4 points
    c.loss.dice = "linear"  # sum(p) + sum(g) denominator
    c.data.augment.zoom = 0.3  # +-30%: the training CT is 1.43 mm per input pixel at 256 px, the DICOM patient 1.95 mm
    c.eval.every_steps = 500  # validate every 500 steps
    c.eval.batch_size = 8  # validation batch
    c.eval.max_batches = 8  # 64 slices
    c.log_every_steps = 10  # progress line every 10 steps
    c.checkpoint.every_steps = 250  # save every 250 steps (a later session can resume)
    c.checkpoint.max_to_keep = 2  # keep the last 2
    if runlocal:
        c.model.image_size = 64  # 4x4 embedding grid, 16x16 mask logits
        c.model.encoder_dim = 32  # ViT width
        c.model.encoder_depth = 2  # ViT blocks
        c.model.encoder_heads = 2  # ViT heads
        c.model.window_size = 2  # 2x2 windows
        c.model.global_attn_indexes = (1,)  # last block global
        c.model.prompt_embed_dim = 32  # decoder width
        c.model.decoder_heads = 2  # decoder heads
        c.model.decoder_mlp_dim = 64  # decoder MLP width
        c.model.iou_head_hidden_dim = 32  # IoU head width
        c.optim.learning_rate = 1e-3  # the tiny model learns fast
        c.optim.schedule = "constant"  # no decay in a 60-step run
        c.optim.warmup_steps = 0  # no warm-up
        c.data.structures = SMOKE_STRUCTURES  # five large organs present in both volumes
        c.data.prompts.mixture.update(dict(point=0.2, box=0.2, mask=0.2, mask_points=0.2, box_mask=0.2))
        c.data.augment.zoom = 0.15  # the smoke test keeps its original augmentation
        c.num_train_steps = 60  # a minute or two
        c.eval.every_steps = -1  # validate at the end only
        c.eval.at_start = True  # and before the first step, as the baseline
        c.data.val_max_samples = 32  # held-out slices
        c.eval.max_batches = 4  # 32 slices
        c.checkpoint.every_steps = -1  # save at the end only
    return c
