"""Kill-and-resume equals an uninterrupted run: same next batch (the Grain iterator state is in the
checkpoint), same losses after the resume, same final parameters. A fake incomplete Orbax temporary
directory left by a "killed mid-save" run must be ignored (and cleaned up) on restart."""

import json
import os
import math

import pytest

from train_testlib import check, purge_steps, run_python, tiny_config

WORKER = r"""
import json, os, pathlib, sys, jax, numpy as np
from train_testlib import purge_steps, tiny_config
from radsam_jax.train import checkpointing, loop
from radsam_jax.train.synthetic import make_synthetic_iterator
root = pathlib.Path(sys.argv[1])

def losses(workdir):
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

def final_params(workdir, step):
    ck = checkpointing.Checkpointer(workdir / "checkpoints", async_save=False)
    params = ck.restore_state_arrays(step)["params"]
    ck.close()
    return params

# Uninterrupted: 6 steps.
a = root / "a"
loop.train_and_evaluate(tiny_config(num_train_steps=6), str(a))
# Interrupted: 3 steps (checkpointed at 3), then a fake half-written step-5 checkpoint, then resume to 6.
b = root / "b"
loop.train_and_evaluate(tiny_config(num_train_steps=3), str(b))
# Steps 4 and 5 logged by a run killed before it saved them, the last row cut short.
with open(b / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0}) + "\n" + '{"step": 6, "lo')
tmp = b / "checkpoints" / "5.orbax-checkpoint-tmp-1234567"
(tmp / "state").mkdir(parents=True)
(tmp / "state" / "garbage").write_text("half written")
ck = checkpointing.Checkpointer(b / "checkpoints", async_save=False)
latest = ck.latest_step()
# The next batch after the step-3 checkpoint is the 4th batch of a fresh iterator.
mc, _ = loop.load_model(tiny_config())
c = tiny_config()
fresh = make_synthetic_iterator(mc, split="train", batch_size=4, seed=0, num_examples=c.synthetic.num_train)
for _ in range(3):
    next(fresh)
expected = next(fresh)
it = make_synthetic_iterator(mc, split="train", batch_size=4, seed=0, num_examples=c.synthetic.num_train)
restored = ck.manager.restore(3, args=__import__("orbax.checkpoint", fromlist=["args"]).args.Composite(
    data_iter=__import__("grain").checkpoint.CheckpointRestore(it)))
ck.close()
got = next(it)
same_batch = all(np.array_equal(expected[k], got[k]) for k in expected)
loop.train_and_evaluate(tiny_config(num_train_steps=6), str(b))
la, lb = losses(a), losses(b)
pa, pb = final_params(a, 6), final_params(b, 6)
diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
print(json.dumps({"latest_before_resume": latest, "same_batch": same_batch, "losses_a": la, "losses_b": lb,
                  "purge_steps_a": purge_steps(a), "purge_steps_b": purge_steps(b),
                  "param_max_abs_diff": diff, "tmp_left": tmp.exists(),
                  "logged_b": [json.loads(l)["step"] for l in open(b / "metrics.jsonl") if "loss" in json.loads(l)],
                  "steps_b": sorted(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit())}))
"""


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    out = check(run_python(WORKER.replace("sys.argv[1]", repr(str(tmp_path)))))
    r = json.loads(out.strip().splitlines()[-1])
    assert r["latest_before_resume"] == 3, r  # the incomplete step-5 directory is not a checkpoint
    assert r["same_batch"], r
    la, lb = r["losses_a"], r["losses_b"]
    assert sorted(map(int, la)) == sorted(map(int, lb)) == list(range(1, 7)), (la, lb)
    for s in la:
        assert abs(la[s] - lb[s]) <= 1e-6 * abs(la[s]), (s, la[s], lb[s])
    assert r["param_max_abs_diff"] == 0.0, r
    assert not r["tmp_left"], r  # cleaned up at start-up
    assert r["logged_b"] == list(range(1, 7)), r  # the rows logged after the checkpoint, and a torn one, dropped
    # TensorBoard likewise hides what the earlier event files hold after step 3 (a fresh run: from step 0,
    # the points of an attempt killed before its first checkpoint).
    assert r["purge_steps_a"] == [0] and r["purge_steps_b"] == [0, 4], r
    assert r["steps_b"][-1] == 6


# One process for the scenarios below (compiles dominate on 2 cores); each stage records its outcome
# or its error, so every test reports its own item.
RUN_RECORD_WORKER = r"""
import contextlib, io, json, os, pathlib, shutil, sys, jax
from train_testlib import tiny_config
from radsam_jax.checkpoint import save_model
from radsam_jax.model import init_variables
from radsam_jax.train import checkpointing, loop
from radsam_jax.train.export import export_model
root = pathlib.Path(sys.argv[1])
out = {}

def rows(workdir):
    return [json.loads(l) for l in open(workdir / "metrics.jsonl")]

def stage(name, fn):
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            out[name] = {"result": fn()}
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"}
    out[name]["stdout"] = buffer.getvalue()

def train(workdir, **overrides):
    loop.train_and_evaluate(tiny_config(**overrides), str(workdir))
    return rows(workdir)

stage("log_every_0", lambda: train(root / "log0", num_train_steps=2, log_every_steps=0))
# A run from an init checkpoint, which is then moved away.
mc, _ = loop.load_model(tiny_config())
save_model(root / "init", mc, jax.device_get(init_variables(mc, jax.random.PRNGKey(1))))
run = root / "run"
init = dict(init_checkpoint=str(root / "init"))
stage("first", lambda: train(run, num_train_steps=2, **init))
stage("finished", lambda: train(run, num_train_steps=2, **init))
def parts_read(step):  # export reads the model's variables only, equal to those of the whole state
    import numpy as np
    ck = checkpointing.Checkpointer(run / "checkpoints", async_save=False, read_only=True)
    whole = ck.restore_state_arrays(step, parts=tuple(ck.manager.item_metadata(step)["state"].tree))
    part = ck.restore_state_arrays(step)
    try:
        ck.restore_state_arrays(step, parts=("params", "ema"))
        missing = "no error"
    except KeyError as e:
        missing = str(e)
    ck.close()
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(part), jax.tree.leaves({k: whole[k] for k in part})))
    return {"whole": sorted(whole), "part": sorted(part), "same": same, "missing": missing}
stage("parts", lambda: parts_read(2))
os.rename(root / "init", root / "init_moved")
stage("resume_without_init", lambda: train(run, num_train_steps=3, **init))
stage("export_without_init", lambda: export_model(run, root / "exported").name)
# The config's own architecture (preset + overrides): equal is fine, another one is refused.
stage("changed_model", lambda: train(run, num_train_steps=4, init_checkpoint="", **{"model.encoder_depth": 3}))
stage("same_model", lambda: train(run, num_train_steps=4, init_checkpoint=""))
# A run of an older radsam-jax (no stored model config) exports through its init checkpoint again
# (step 3: trained with init_checkpoint in its config).
for step_dir in (run / "checkpoints").iterdir():
    shutil.rmtree(step_dir / "model_config", ignore_errors=True)
# Resuming it with another architecture: its saved arrays tell, before any work (step 4 is the latest).
stage("old_run_changed_width", lambda: train(run, num_train_steps=5, init_checkpoint="", **{"model.encoder_dim": 48}))
stage("old_run_changed_depth", lambda: train(run, num_train_steps=5, init_checkpoint="", **{"model.encoder_depth": 3}))
stage("export_old_run_init_gone", lambda: export_model(run, root / "exported_old_gone", 3).name)
os.rename(root / "init_moved", root / "init")
stage("export_old_run", lambda: export_model(run, root / "exported_old", 3).name)
# A run trained with another CT window than the default: its model records it (ModelConfig.ct_window).
from radsam_jax.checkpoint import load_config
windowed = root / "windowed"
window = lambda level, width: {"data.window_level": level, "data.window_width": width}
def export_window(dst, step=None):
    return list(load_config(export_model(windowed, root / dst, step)).ct_window)
def forget_window(step):  # the record of a radsam-jax before ct_window existed
    for f in (windowed / "checkpoints" / str(step) / "model_config").rglob("*"):
        if f.is_file() and "ct_window" in f.read_text():
            record = json.loads(f.read_text())
            del record["ct_window"]
            f.write_text(json.dumps(record))
            return True
    return False
stage("window_first", lambda: train(windowed, num_train_steps=1, **window(60.0, 350.0)))
stage("window_export", lambda: export_window("exported_window"))
stage("window_record_without_it", lambda: forget_window(1))
stage("window_export_old_record", lambda: export_window("exported_window_old_record"))
# Resuming with another window is allowed (not architecture): the model records the one it trains with now.
stage("window_resume_changed", lambda: train(windowed, num_train_steps=2, **window(50.0, 500.0)))
stage("window_export_changed", lambda: export_window("exported_window_changed", 2))
# The old run resumes with the config's own architecture (after the exports above, which read step 3).
stage("old_run_same_model", lambda: train(run, num_train_steps=5, init_checkpoint=""))
# Gradient accumulation is not part of the state: a run resumes with another number of microbatches.
stage("resume_accumulated", lambda: train(run, num_train_steps=6, init_checkpoint="", grad_accum_steps=2))
# SIGTERM during the last step: that step is saved, not validated; the next start only validates.
def stopped_at_the_last_step(steps):
    real, calls = checkpointing.stop_requested_anywhere, []
    checkpointing.stop_requested_anywhere = lambda local: calls.append(local) or len(calls) == steps
    try:
        return train(root / "stopped", num_train_steps=steps)
    finally:
        checkpointing.stop_requested_anywhere = real
stage("stopped", lambda: stopped_at_the_last_step(2))
stage("stopped_rerun", lambda: train(root / "stopped", num_train_steps=2))
stage("stopped_rerun_again", lambda: train(root / "stopped", num_train_steps=2))
# Settings that change the saved state's form: refused before the restore, except freezing parameters.
no_init = dict(init_checkpoint="")
stage("resume_clipped", lambda: train(run, num_train_steps=7, **no_init, **{"optim.grad_clip_norm": 1.0}))
stage("resume_frozen", lambda: train(run, num_train_steps=7, **no_init, **{"optim.frozen": ("image_encoder/.*",)}))
stage("resume_unfrozen", lambda: train(run, num_train_steps=8, **no_init))
# float16 from here on: the loss scale starts at loss_scale.initial, not at the float32 run's 1.
frozen = {"optim.frozen": ("image_encoder/.*",)}
stage("resume_float16", lambda: train(run, num_train_steps=8, **no_init, **frozen, precision="float16"))
def resumable(saved_changes, **overrides):  # _check_resumable of the last checkpoint, its saved config changed
    import copy
    ck = checkpointing.Checkpointer(run / "checkpoints", async_save=False, read_only=True)
    try:
        state = ck.manager.item_metadata(ck.latest_step())["state"].tree
        saved = copy.deepcopy(ck.restore_config())
        saved_changes(saved)
        loop._check_resumable(ck, state, saved, tiny_config(**overrides), [])
        return "no error"
    finally:
        ck.close()
def workers_changed(saved_workers, workers):
    def saved_with(saved):
        saved["data_source"], saved["data"]["num_workers"] = "pipeline", saved_workers
    return resumable(saved_with, data_source="pipeline", **{"data.num_workers": workers})
stage("resume_with_workers", lambda: workers_changed(0, 2))
stage("resume_with_fewer_workers", lambda: workers_changed(2, 1))
stage("resume_with_as_many_workers", lambda: workers_changed(2, 2))
def mixture(saved):
    saved["data_source"], saved["data_mixture"] = "mixture", {"amos": 1.0, "totalseg": 1.0}
stage("resume_synthetic_as_pipeline", lambda: resumable(lambda saved: None, data_source="pipeline"))
stage("resume_mixture_with_another_dataset", lambda: resumable(
    mixture, data_source="mixture", data_mixture={"amos": 1.0, "totalseg": 1.0, "generic": 1.0}))
stage("resume_mixture_reweighted", lambda: resumable(mixture, data_source="mixture", data_mixture={"amos": 3.0, "totalseg": 1.0}))
# The saved data position counts batches: another batch size would skip or repeat samples.
stage("resume_with_another_batch", lambda: resumable(lambda saved: None, batch_size=2 * tiny_config().batch_size))
stage("resume_with_the_same_batch", lambda: resumable(lambda saved: None))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def run_record(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_record")
    result = check(run_python(RUN_RECORD_WORKER.replace("sys.argv[1]", repr(str(root)))))
    return root, json.loads(result.strip().splitlines()[-1])


def _ok(stage: dict):
    assert "error" not in stage, stage
    return stage["result"]


def test_log_every_steps_zero_logs_the_last_step_only(run_record):
    rows = _ok(run_record[1]["log_every_0"])
    assert [r["step"] for r in rows if "loss" in r] == [2], rows


def test_rerunning_a_finished_run_appends_nothing(run_record):
    r = run_record[1]
    before, after = _ok(r["first"]), _ok(r["finished"])
    assert after == before
    assert "already finished at step 2" in r["finished"]["stdout"], r["finished"]


def test_export_reads_only_the_model_variables(run_record):
    got = _ok(run_record[1]["parts"])
    assert {"opt_state", "params", "buffers"} <= set(got["whole"]) and got["part"] == ["buffers", "params"]
    assert got["same"]
    assert "no ['ema']" in got["missing"] and "checkpoints/2" in got["missing"], got["missing"]


def test_a_resume_that_changes_the_state_form_is_a_config_error(run_record):
    r = run_record[1]
    clipped = r["resume_clipped"].get("error", "")
    assert clipped.startswith("ConfigError: ") and "checkpoints/6 cannot continue with this config: its saved state has no" in clipped
    assert "optim.grad_clip_norm 0.0 -> 1.0" in clipped and "radsam export" in clipped, clipped
    assert [x["step"] for x in _ok(r["resume_frozen"]) if "loss" in x][-1] == 7  # freezing leaves moments unread
    unfrozen = r["resume_unfrozen"].get("error", "")
    assert "checkpoints/7 cannot continue" in unfrozen and "mu/image_encoder/" in unfrozen, unfrozen
    assert "optim.frozen ['image_encoder/.*'] -> []" in unfrozen, unfrozen
    for name, saved, now in (("resume_with_workers", 0, 2), ("resume_with_fewer_workers", 2, 1)):
        workers = r[name].get("error", "")
        assert f"saved its data order with {saved} Grain worker process(es) (data.num_workers={saved})" in workers, workers
        assert f"resumes only with as many, not data.num_workers={now}" in workers, workers
    assert _ok(r["resume_with_as_many_workers"]) == "no error"
    # The saved data order is its source's (one state per mixture dataset): another source is refused.
    other = r["resume_synthetic_as_pipeline"].get("error", "")
    assert other.startswith("ConfigError: ") and "saved the data order of data_source 'synthetic', and it resumes only " \
        "from the same data, not 'pipeline'; resume with the run's settings" in other, other
    added = r["resume_mixture_with_another_dataset"].get("error", "")
    assert "data_source 'mixture' of amos, totalseg, and it resumes only from the same data, not 'mixture' of " \
        "amos, generic, totalseg" in added, added
    assert _ok(r["resume_mixture_reweighted"]) == "no error"  # new weights, the same datasets
    batch = r["resume_with_another_batch"].get("error", "")
    assert batch.startswith("ConfigError: ") and "saved its data position in batches of" in batch, batch
    assert "would skip or repeat training samples" in batch and "grad_accum_steps" in batch, batch
    assert _ok(r["resume_with_the_same_batch"]) == "no error"


def test_a_resume_in_float16_starts_the_loss_scale_afresh(run_record):
    rows = [x for x in _ok(run_record[1]["resume_float16"]) if "loss" in x]
    assert rows[-1]["step"] == 8 and rows[-1]["loss_scale"] == tiny_config().loss_scale.initial, rows[-1]


def test_resume_and_export_do_not_need_the_init_checkpoint(run_record):
    from radsam_jax import checkpoint

    root, r = run_record
    rows = _ok(r["resume_without_init"])
    assert [x["step"] for x in rows if "loss" in x][-1] == 3
    assert _ok(r["export_without_init"]) == "exported"
    from radsam_jax.train.loop import load_model
    from train_testlib import tiny_config

    assert checkpoint.load_config(root / "exported") == load_model(tiny_config())[0]


def test_resuming_with_another_architecture_is_a_config_error(run_record):
    r = run_record[1]
    error = r["changed_model"].get("error", "")
    assert error.startswith("ConfigError") and "encoder_depth 2 (checkpoint) != 3 (config)" in error, r["changed_model"]
    assert [x["step"] for x in _ok(r["same_model"]) if "loss" in x][-1] == 4


def test_resuming_an_old_run_with_another_architecture_is_a_config_error(run_record):
    root, r = run_record
    where = f"{root / 'run' / 'checkpoints' / '4'} does not record its model (older radsam-jax) and its parameters " \
            "do not match the architecture the config gives: "
    for name, difference in [("old_run_changed_width", "params/image_encoder/blocks_0/attn/proj/bias is (32,) in the "
                                                       "checkpoint, (48,) in the config's model"),
                             ("old_run_changed_depth", "the checkpoint has no params/image_encoder/blocks_2/")]:
        error = r[name].get("error", "")
        assert error.startswith(f"ConfigError: {where}{difference}"), r[name]
        assert r[name]["stdout"] == "", r[name]  # refused before any work
    assert [x["step"] for x in _ok(r["old_run_same_model"]) if "loss" in x][-1] == 5


def test_a_run_stopped_at_its_last_step_is_validated_when_rerun(run_record):
    r = run_record[1]
    stopped = _ok(r["stopped"])
    assert "saving step 2 and exiting" in r["stopped"]["stdout"], r["stopped"]
    assert [x["step"] for x in stopped] == [1, 2] and not any("validation_loss" in x for x in stopped), stopped
    rerun = _ok(r["stopped_rerun"])
    assert rerun[:2] == stopped and len(rerun) == 3, rerun  # no training step, one validation
    assert rerun[2]["step"] == 2 and "validation_loss" in rerun[2] and "loss" not in rerun[2], rerun
    assert "not its final validation" in r["stopped_rerun"]["stdout"], r["stopped_rerun"]
    assert _ok(r["stopped_rerun_again"]) == rerun
    assert "already finished at step 2" in r["stopped_rerun_again"]["stdout"], r["stopped_rerun_again"]


def test_runs_without_a_stored_model_config_export_as_before(run_record):
    r = run_record[1]
    assert "FileNotFoundError" in r["export_old_run_init_gone"].get("error", ""), r["export_old_run_init_gone"]
    assert _ok(r["export_old_run"]) == "exported_old"


def test_export_records_the_training_ct_window(run_record):
    r = run_record[1]
    _ok(r["window_first"])
    assert "CT window 60/350 HU" in r["window_first"]["stdout"], r["window_first"]
    assert _ok(r["window_export"]) == [60.0, 350.0]
    # A checkpoint whose stored model config predates ct_window: the run's data config gives it.
    assert _ok(r["window_record_without_it"]) is True
    assert _ok(r["window_export_old_record"]) == [60.0, 350.0]
    _ok(r["window_resume_changed"])
    assert _ok(r["window_export_changed"]) == [50.0, 500.0]


def test_default_window_runs_export_the_default(run_record):
    from radsam_jax import checkpoint

    root, r = run_record
    _ok(r["export_without_init"])
    assert checkpoint.load_config(root / "exported").ct_window == (40.0, 400.0)


def test_export_of_a_missing_run_creates_nothing(tmp_path):
    from radsam_jax.train.export import export_model

    with pytest.raises(FileNotFoundError, match="nonexistent"):
        export_model(tmp_path / "nonexistent", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_destination_in_the_runs_checkpoints(run_record, capsys):
    """Orbax would take it for a step, and the run could not be exported or resumed any more."""
    import argparse

    from radsam_jax.train.export import run

    root, _ = run_record
    dst = root / "run" / "checkpoints" / "99"
    assert run(argparse.Namespace(workdir=str(root / "run"), dst=str(dst), step=None)) == 2
    assert "is inside the run's checkpoints folder, where it would be taken for a step" in capsys.readouterr().err
    assert not dst.exists()


def test_cli_mistakes_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
    """A folder as --config, a file as --workdir: exit 2, one line; Ctrl-C in a subcommand: exit 130."""
    from radsam_jax import cli
    from radsam_jax.train import export

    assert cli.main(["train", "--config", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
    assert f"radsam train: error: config file {tmp_path} is not a Python file" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.write_text("")
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/train/example_cpu.py:runlocal")
    assert cli.main(["train", "--config", config, "--workdir", str(taken)]) == 2
    assert f"radsam train: error: --workdir {taken} is a file, not a folder" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_model", interrupted)
    assert cli.main(["export", str(tmp_path / "w"), str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == "radsam export: interrupted"


def test_a_run_resumes_with_gradient_accumulation(run_record):
    _, r = run_record
    rows = _ok(r["resume_accumulated"])
    assert "global batch 4 in 2 microbatches of 2" in r["resume_accumulated"]["stdout"]
    assert "resumed from" in r["resume_accumulated"]["stdout"]
    # Changed settings are named (the run goes on with them): num_train_steps 5 -> 6, grad_accum_steps 1 -> 2.
    assert ("warning: resumed with another config than the run's last checkpoint: grad_accum_steps 1 -> 2; "
            "num_train_steps 5 -> 6 (the run goes on with the new values)") in r["resume_accumulated"]["stdout"]
    assert "warning: resumed with another config" not in r["finished"]["stdout"]
    step6 = [row for row in rows if row["step"] == 6 and "loss" in row]
    assert len(step6) == 1 and math.isfinite(step6[0]["loss"]), rows[-3:]


def test_a_restart_from_step_0_drops_the_killed_runs_rows(tmp_path):
    """A run killed before its first checkpoint starts again at step 0 and logs its step-0 validation
    and steps again: none of the earlier rows may stay, and TensorBoard purges from step 0."""
    from radsam_jax.train.loop import MetricWriter

    first = MetricWriter(tmp_path)
    first.start_at(0)
    first.write(0, {"loss": 1.0}, prefix="validation_")
    first.write(1, {"loss": 2.0})
    first.close()
    again = MetricWriter(tmp_path)
    assert again.start_at(0) == 2
    again.write(0, {"loss": 1.5}, prefix="validation_")
    again.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 0, "validation_loss": 1.5}]
    assert set(purge_steps(tmp_path)) == {0}

