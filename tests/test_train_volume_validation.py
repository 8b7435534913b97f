"""Volume validation during training (eval.volume_cases): the 3D Dice the run logs is the one
`radsam evaluate` gives its exported model on the same volume with the same setting, computed on
one device of the process whatever the training mesh."""

import json

import pytest

from train_testlib import check, run_python

TRAIN_AND_EVALUATE = r"""
import json, sys
from pathlib import Path
from data_fixtures import write_generic
from radsam_jax.cli import main as radsam
from radsam_jax.inference import VolumePredictor
from radsam_jax.train import loop
from radsam_jax.train.config_lib import pipeline_data_config
from train_testlib import tiny_config

devices_used = []  # devices holding each validation volume's embeddings
encode = VolumePredictor.encode_slices
def spy(self, lo, hi, progress=None):
    n = encode(self, lo, hi, progress)
    devices_used.append(len(self.embeddings.sharding.device_set))
    return n
VolumePredictor.encode_slices = spy

tmp = Path(sys.argv[1])
train, val = write_generic(tmp / "train", ("a",)), write_generic(tmp / "val", ("b", "c"))
c = tiny_config(**{"data_source": "pipeline", "num_train_steps": 2, "eval.volume_cases": 1, "eval.max_batches": 1})
c.data = pipeline_data_config(format="generic", root=str(train), val_root=str(val), min_area=4, read_threads=1,
                              structures=("organ",))
result = loop.train_and_evaluate(c, str(tmp / "run"))
assert devices_used and set(devices_used) == {1}, devices_used
assert radsam(["export", str(tmp / "run"), str(tmp / "model")]) == 0
assert radsam(["evaluate", "--checkpoint", str(tmp / "model"), "--data", str(val), "--protocol", "volume",
               "--prompt", "box", "--propagation", "mask", "--edits", "0", "--min-slices", "1", "--bootstrap", "10",
               "--structures", "organ", "--max-cases", "1", "--worst", "0", "--no-progress", "--out", str(tmp / "eval")]) == 0
print(json.dumps({k: v for k, v in result.items() if k.startswith("validation_volume")}))
"""


@pytest.mark.parametrize("devices", [1, 2])  # 2: the parameters replicated over a mesh of two devices
def test_volume_validation_is_the_benchmarks_volume_dice(tmp_path, devices):
    out = check(run_python(TRAIN_AND_EVALUATE.replace("sys.argv[1]", repr(str(tmp_path))), devices=devices, timeout=900))
    logged = json.loads(out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("validation_volume_dice" in row for row in rows)  # in metrics.jsonl (and TensorBoard)
    assert "3D dice" in out
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    setting = next(s for s in summary["settings"] if s["protocol"] == "volume" and s["edits"] == 0)
    # Same weights, volume (the first of two), structures (data.structures), prompt and propagation:
    # the same object and the same 3D Dice.
    assert logged["validation_volume_objects"] == setting["n"] == 1
    assert logged["validation_volume_dice"] == pytest.approx(setting["mean_dice"], abs=1e-9)
    assert logged["validation_volume_dice/organ"] == logged["validation_volume_dice"]
