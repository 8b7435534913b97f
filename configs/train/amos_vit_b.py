"""The paper's RadSAM recipe on AMOS (CT): SAM ViT-B fine-tuned with Adam at a constant 1e-5,
global batch 32 (the paper's batch size 2 on 16 GPUs, read as 2 per GPU), 7 epochs, mask-prompt
training (section 3.2 of the paper).

    radsam train --config configs/train/amos_vit_b.py --workdir runs/amos_vit_b \\
        --config.init_checkpoint=checkpoints/sam_vit_b.radsam --config.data.root=/data/amos22

On fewer devices, keep the global batch and add --config.grad_accum_steps=K (the same updates; each
device then runs 32 / (devices x K) images at a time; memory per step: benchmarks/results/train_throughput.md).
"""

from radsam_jax.train.config_lib import base_config, config_variant, pipeline_data_config, shrink_to_smoke_run


def get_config(arg: str = ""):
    variant = config_variant(arg)  # "runlocal": a 20-step smoke run of this recipe on a CPU
    c = base_config()
    c.model.name = "vit_b"  # architecture when init_checkpoint is empty (from scratch)
    c.init_checkpoint = "checkpoints/sam_vit_b.radsam"  # converted SAM ViT-B (radsam convert); relative = repo-relative
    c.precision = "bfloat16"  # bf16 compute, f32 params (A100/H100/TPU); "float16" on V100
    c.batch_size = 32  # paper: "batch size of 2" on 16 GPUs, read as 2 per GPU (a global 2 cannot split over 16)
    c.num_epochs = 7  # paper: 7 epochs
    c.optim.learning_rate = 1e-5  # paper: Adam, constant 1e-5
    c.optim.schedule = "constant"  # paper: no decay
    c.data_source = "pipeline"  # radsam_jax.data.pipeline
    c.data = pipeline_data_config(
        format="amos",  # dataset.json, imagesTr/labelsTr, imagesVa/labelsVa
        root="",  # AMOS folder: set with --config.data.root=/path/to/amos22
        modality="CT",  # cases <= 500
        num_workers=4,  # Grain worker processes per host
    )
    c.eval.split = "val"  # imagesVa / labelsVa
    c.eval.every_steps = 2000  # validate every 2000 steps
    c.eval.volume_cases = 4  # and score 4 validation volumes in 3D (one box, mask propagation), the paper's metric
    c.checkpoint.every_steps = 2000  # save every 2000 steps
    return shrink_to_smoke_run(c) if variant == "runlocal" else c
