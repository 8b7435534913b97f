"""The small RadSAM trained from scratch on this CPU: ct-abdomen-3mm (generic layout) for training,
validated on held-out slices of another patient and scanner (ct-thorax-abdomen-dicom).

    radsam train --config configs/train/example_cpu.py --workdir /tmp/radsam_example
    radsam train --config configs/train/example_cpu.py:runlocal --workdir /tmp/radsam_tiny  # a few minutes

Paths are relative to the repository root (resolved by radsam_jax.train.config_lib), so CI finds
`../shared/data` beside the checkout. `runlocal` shrinks the model (64 px input, 2 ViT blocks),
the run and the validation set for smoke tests.
"""

from radsam_jax.train.config_lib import base_config, pipeline_data_config, resolve_path

DATA = "../shared/data"
STRUCTURES = ("liver", "spleen", "stomach", "aorta", "inferior_vena_cava")


def get_config(arg: str = ""):
    runlocal = arg == "runlocal"
    c = base_config()
    c.model.name = "small"  # configs/small.py: 256 px input, 6 ViT blocks of width 192, 3.8 M params
    c.init_checkpoint = ""  # from scratch
    c.batch_size = 8  # global batch (one CPU device)
    c.num_epochs = -1  # repeat the single training volume; the run length is num_train_steps
    c.num_train_steps = 2000  # about 1 h on 2 cores at 256 px
    c.optim.learning_rate = 1e-4  # from scratch a tiny model needs more than the paper's fine-tuning 1e-5
    c.optim.warmup_steps = 50  # linear warm-up from 0
    c.optim.grad_clip_norm = 1.0  # clip the global gradient norm
    c.data_source = "pipeline"  # radsam_jax.data.pipeline
    c.data = pipeline_data_config(
        format="generic",  # labels.json per case folder
        root=resolve_path(f"{DATA}/ct-abdomen-3mm"),  # training volume (3 mm, NIfTI)
        val_root=resolve_path(f"{DATA}/ct-thorax-abdomen-dicom"),  # held-out volume (DICOM, other patient)
        structures=STRUCTURES,  # organs present in both volumes
        val_max_samples=64,  # held-out slices per validation
        read_threads=1,  # this CPU has 2 cores shared with the model
        prefetch_buffer_size=2,  # batches read ahead
    )
    c.eval.split = "val"  # the val_root volume
    c.eval.every_steps = 200  # validate every 200 steps
    c.eval.batch_size = 8  # validation batch
    c.eval.max_batches = 8  # 64 slices
    c.log_every_steps = 10  # progress line every 10 steps
    c.checkpoint.every_steps = 500  # save every 500 steps
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
        c.optim.warmup_steps = 0  # no warm-up
        c.num_train_steps = 60  # a minute or two
        c.eval.every_steps = -1  # validate at the end only
        c.eval.at_start = True  # and before the first step, as the baseline
        c.data.val_max_samples = 32  # held-out slices
        c.eval.max_batches = 4  # 32 slices
        c.checkpoint.every_steps = -1  # save at the end only
    return c
