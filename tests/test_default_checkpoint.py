"""The bundled small RadSAM (radsam_jax/assets/default_checkpoint, MODEL_CARD.md): it loads, fits the
25 MB budget, and the README's main command still segments the sample liver above a Dice floor."""

import json
import re
from pathlib import Path

from radsam_jax import cli
from radsam_jax.checkpoint import load_checkpoint
from radsam_jax.inference.cli import DEFAULT_CHECKPOINT, SAMPLE_DIR

REPO = Path(__file__).resolve().parents[1]
# MODEL_CARD.md: the README command gives liver Dice 0.609 with this checkpoint. Float32 summation
# order across CPUs (and TF32 products on GPUs) moves a few boundary pixels, well under 0.01 Dice; a
# broken loader, preprocessing or propagation drops it far below the floor.
README_DICE_FLOOR = 0.58


def test_bundled_checkpoint_is_small_and_described():
    files = [f for f in DEFAULT_CHECKPOINT.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    assert 0 < size <= 25 * 2**20, f"bundled checkpoint is {size / 2**20:.1f} MB"
    model = load_checkpoint(DEFAULT_CHECKPOINT)
    assert model.config.name == "small" and model.config.image_size == 256
    meta = json.loads((DEFAULT_CHECKPOINT / "radsam.json").read_text())["metadata"]
    assert meta["source"] == "radsam train" and meta["step"] > 0


def test_readme_command_segments_the_sample_liver(tmp_path, capsys):
    prompt = ["--slice", "90", "--box", "47", "30", "103", "86", "--bounds", "70", "111"]
    first_lines = (REPO / "README.md").read_text().splitlines()[:6]
    assert any("radsam segment radsam_jax/assets/sample/ct.nii.gz " + " ".join(prompt) in line for line in first_lines)
    out, preview = tmp_path / "liver.nii.gz", tmp_path / "liver.png"
    argv = ["segment", str(SAMPLE_DIR / "ct.nii.gz"), *prompt, "--out", str(out), "--preview", str(preview),
            "--labels", str(SAMPLE_DIR / "labels.nii.gz"), "--label-id", "5"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    match = re.search(r"dice .* vs reference label 5: ([0-9.]+)", printed)
    assert match, printed
    dice = float(match.group(1))
    print(f"README example: liver Dice {dice:.4f} (floor {README_DICE_FLOOR})")
    assert dice >= README_DICE_FLOOR
    assert out.stat().st_size > 0 and preview.stat().st_size > 0
