"""Volume validation during training (eval.volume_cases): the 3D Dice the run logs is the one
`radsam evaluate` gives its exported model on the same volumes with the same setting, computed on
one device of the process whatever the training mesh; with several processes each scores its share
of the volumes and the logged means are those of all of them."""

import csv
import json
import sys

import pytest

from train_testlib import check, launch_processes, run_python

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


# A run from an init checkpoint that reads mask prompts as logits (a converted SAM): the baseline
# before the first step scores it as it declares, the later validations as trained (binary).
FROM_A_LOGITS_CHECKPOINT = r"""
import dataclasses, json, sys
from pathlib import Path
import jax
from data_fixtures import write_generic
from radsam_jax.checkpoint import save_model
from radsam_jax.cli import main as radsam
from radsam_jax.model import init_variables
from radsam_jax.train import loop
from radsam_jax.train.config_lib import pipeline_data_config
from train_testlib import tiny_config

encodings = []  # the mask-prompt encoding of each volume validation
volume_validation = loop.volume_validation
def spy(variables, model_config, config):
    encodings.append(model_config.mask_prompt)
    return volume_validation(variables, model_config, config)
loop.volume_validation = spy

tmp = Path(sys.argv[1])
train, val = write_generic(tmp / "train", ("a",)), write_generic(tmp / "val", ("b",))
c = tiny_config(**{"data_source": "pipeline", "num_train_steps": 1, "eval.volume_cases": 1, "eval.max_batches": 1,
                   "eval.at_start": True})
c.data = pipeline_data_config(format="generic", root=str(train), val_root=str(val), min_area=4, read_threads=1,
                              structures=("organ",))
mc = dataclasses.replace(loop.configured_model_config(c), mask_prompt="logits")
save_model(tmp / "sam", mc, jax.device_get(init_variables(mc, jax.random.PRNGKey(3))))
c.init_checkpoint = str(tmp / "sam")
loop.train_and_evaluate(c, str(tmp / "run"))
assert radsam(["evaluate", "--checkpoint", str(tmp / "sam"), "--data", str(val), "--protocol", "volume",
               "--prompt", "box", "--propagation", "mask", "--edits", "0", "--bootstrap", "10", "--structures", "organ",
               "--max-cases", "1", "--worst", "0", "--no-progress", "--out", str(tmp / "eval")]) == 0
print(json.dumps(encodings))
"""


def test_the_baseline_reads_mask_prompts_as_the_init_checkpoint_declares(tmp_path):
    out = check(run_python(FROM_A_LOGITS_CHECKPOINT.replace("sys.argv[1]", repr(str(tmp_path))), timeout=900))
    assert json.loads(out.strip().splitlines()[-1]) == ["logits", "binary"]  # step 0, then the last step
    baseline = next(row for row in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
                    if row["step"] == 0 and "validation_volume_dice" in row)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    setting = next(s for s in summary["settings"] if s["protocol"] == "volume" and s["edits"] == 0)
    assert baseline["validation_volume_dice"] == pytest.approx(setting["mean_dice"], abs=1e-9)


# Each of 2 processes (1 CPU device each) trains the same 2 steps; the volume validation's spy records
# which validation volumes this process scored.
TWO_PROCESS_TRAIN = r"""
import json, sys
from pathlib import Path
import jax
from radsam_jax.evaluate import runner
from radsam_jax.train import loop
from radsam_jax.train.config_lib import pipeline_data_config
from train_testlib import tiny_config

scored = []
evaluate_cases = runner.evaluate_cases
def spy(cases, *args, **kwargs):
    scored.extend(case.case_id for case in cases)
    return evaluate_cases(cases, *args, **kwargs)
runner.evaluate_cases = spy

tmp = Path(sys.argv[1])
c = tiny_config(**{"data_source": "pipeline", "num_train_steps": 2, "eval.volume_cases": 3, "eval.max_batches": 1,
                   "batch_size": 2, "eval.batch_size": 2})
c.data = pipeline_data_config(format="generic", root=str(tmp / "train"), val_root=str(tmp / "val"), min_area=4,
                              read_threads=1, structures=("organ", "bone"))
result = loop.train_and_evaluate(c, str(tmp / "run"))
(tmp / f"process_{jax.process_index()}.json").write_text(json.dumps(
    {"scored": scored, "logged": {k: v for k, v in result.items() if k.startswith("validation_volume")}}))
"""


def test_two_processes_share_the_volumes_and_log_the_benchmarks_means(tmp_path):
    from data_fixtures import write_generic
    from radsam_jax.cli import main as radsam

    write_generic(tmp_path / "train", ("a",))
    val = write_generic(tmp_path / "val", ("b", "c", "d"))
    launch_processes([sys.executable, "-c", TWO_PROCESS_TRAIN, str(tmp_path)], processes=2, devices=1,
                     log_path=tmp_path / "launch.log", timeout=600)
    processes = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
    assert [p["scored"] for p in processes] == [["b", "d"], ["c"]]  # volumes p, p + 2, ... of the first 3
    assert processes[0]["logged"] == processes[1]["logged"]  # every process holds the gathered result
    logged = processes[0]["logged"]

    assert radsam(["export", str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    assert radsam(["evaluate", "--checkpoint", str(tmp_path / "model"), "--data", str(val), "--protocol", "volume",
                   "--prompt", "box", "--propagation", "mask", "--edits", "0", "--min-slices", "1", "--bootstrap", "10",
                   "--structures", "organ,bone", "--max-cases", "3", "--worst", "0", "--no-progress",
                   "--out", str(tmp_path / "eval")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    assert logged["validation_volume_objects"] == len(rows) == 6  # 3 volumes x (organ, bone)
    # scores.csv holds 6 decimals
    assert logged["validation_volume_dice"] == pytest.approx(sum(float(r["dice"]) for r in rows) / 6, abs=1e-6)
    for name in ("organ", "bone"):
        dice = [float(r["dice"]) for r in rows if r["structure"] == name]
        assert logged[f"validation_volume_dice/{name}"] == pytest.approx(sum(dice) / len(dice), abs=1e-6)


def test_the_gather_is_exact_and_a_failure_on_one_process_stops_the_others(monkeypatch):
    """gather_sums as 2 processes see it (the all-gather stubbed with process 1's share): float64 sums
    are exact (a float32 transfer would round 0.1), and a failure on process 1 raises on process 0
    instead of leaving it waiting."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from radsam_jax.train.volume_validation import VolumeValidationError, gather_sums

    other = {"sums": np.array([[0.1, 1.0], [0.2, 1.0]]), "failed": 0.0}

    def allgather(bits):
        rows = np.concatenate([other["sums"], [[other["failed"], 0.0]]]).view(np.uint32)
        return np.stack([bits, rows])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    mine = np.array([[1 / 3, 1.0], [0.0, 0.0]])
    total = gather_sums(mine)
    assert total.dtype == np.float64 and total.tolist() == [[1 / 3 + 0.1, 2.0], [0.2, 1.0]]
    other["failed"] = 1.0
    with pytest.raises(VolumeValidationError, match="failed on 1 other process"):
        gather_sums(mine)
    other["failed"] = 0.0
    gather_sums(mine, failed=True)  # only this process failed: it raises its own error after the gather


def test_a_process_whose_volumes_fail_releases_the_others_then_raises(tmp_path, monkeypatch):
    from data_fixtures import write_generic
    from radsam_jax.train import volume_validation as vv
    from radsam_jax.train.config_lib import base_config, pipeline_data_config

    c = base_config()
    c.data = pipeline_data_config(format="generic", root=str(write_generic(tmp_path / "train", ("a",))),
                                  val_root=str(write_generic(tmp_path / "val", ("b", "c"))), structures=("organ",))
    c.eval.volume_cases = 2
    gathered = []

    def unreadable(*args):
        raise OSError("b/ct.nii.gz: truncated file")

    monkeypatch.setattr(vv, "_scored_sums", unreadable)
    monkeypatch.setattr(vv, "gather_sums", lambda sums, failed=False: gathered.append((sums.shape, failed)))
    with pytest.raises(OSError, match="truncated"):  # its own error, after taking part in the gather
        vv.volume_validation({}, None, c)
    assert gathered == [((1, 2), True)]  # one structure: the shape every process sends
