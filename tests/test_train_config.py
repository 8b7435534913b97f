"""Training configs: every configs/train file loads, overrides take the field's type, and a key
that does not exist is a clear error naming the closest keys (in-process, no training)."""

import argparse
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from radsam_jax.train import cli
from radsam_jax.train.config_lib import ConfigError, apply_overrides, load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs" / "train").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    c = load_config_file(str(path))
    assert c.optim.learning_rate > 0 and c.batch_size > 0
    assert c.precision in ("float32", "bfloat16", "float16")


def test_every_config_field_has_a_comment():
    for path in CONFIGS + [REPO / "radsam_jax" / "train" / "config_lib.py"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith("c.") and " = " in s and not s.endswith(("(", "[", "{", "ConfigDict()")) and "#" not in s:
                pytest.fail(f"{path.name}:{n} config field without a comment: {s}")


def test_paper_recipe():
    c = load_config_file(str(REPO / "configs/train/amos_vit_b.py"))
    assert (c.batch_size, c.optim.learning_rate, c.optim.schedule, c.num_epochs) == (32, 1e-5, "constant", 7)


def test_overrides_take_the_field_type():
    c = load_config_file(str(REPO / "configs/train/example_cpu.py"))
    apply_overrides(c, ["optim.learning_rate=3e-4", "batch_size=16", "remat=true", "optim.frozen=image_encoder/.*",
                        "model.global_attn_indexes=(1, 3)"])
    assert c.optim.learning_rate == 3e-4 and isinstance(c.optim.learning_rate, float)
    assert c.batch_size == 16 and c.remat is True
    assert tuple(c.optim.frozen) == ("image_encoder/.*",)
    assert tuple(c.model.global_attn_indexes) == (1, 3)


def test_unknown_key_is_a_clear_error():
    c = load_config_file(str(REPO / "configs/train/example_cpu.py"))
    with pytest.raises(ConfigError, match=r"no key 'optim.learning_rat'.*optim\.learning_rate"):
        apply_overrides(c, ["optim.learning_rat=1e-4"])
    with pytest.raises(ConfigError, match=r"no key 'learning_rate'.*optim\.learning_rate"):
        apply_overrides(c, ["learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="bad value for batch_size"):
        apply_overrides(c, ["batch_size=eight"])


def test_cli_subcommand_parses_overrides():
    parser = argparse.ArgumentParser(prog="radsam")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", "configs/train/example_cpu.py", "--workdir", "w",
                              "--config.optim.learning_rate=1e-4", "--config.batch_size", "2"])
    assert cli.parse_overrides(args.overrides) == ["optim.learning_rate=1e-4", "batch_size=2"]


def test_cli_unknown_key_exits_2_with_message():
    r = subprocess.run([sys.executable, "-m", "radsam_jax.train.cli", "--config", "configs/train/example_cpu.py",
                        "--workdir", "/tmp/unused", "--config.optim.lerning_rate=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no key 'optim.lerning_rate'" in r.stderr and "optim.learning_rate" in r.stderr, r.stderr


def _train_cli(workdir, *overrides, devices=1, config="configs/train/example_cpu.py:runlocal"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "radsam_jax.train.cli", "--config", config, "--workdir", str(workdir),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides, message", [
    (["--config.batch_size=3"], "batch_size 3 is not a positive multiple of the 2 devices"),
    (["--config.eval.batch_size=5"], "eval.batch_size 5 is not a positive multiple of the 2 devices"),
    (["--config.num_devices=4"], "num_devices 4 is more than the 2 cpu device(s)"),
    (["--config.attention=flash"], "attention: unknown attention implementation 'flash'"),
    (["--config.grad_accum_steps=8"], "grad_accum_steps 8: batch_size 8 does not split into 8 microbatches "
                                      "over the 2 devices of the mesh (it must be a multiple of 2 x 8)"),
    (["--config.init_checkpoint=/nonexistent/ckpt"], "cannot build the model: no model checkpoint at /nonexistent/ckpt"),
    (["--config.loss.dice=cubic"], "loss.dice must be one of squared, linear, got 'cubic'"),
    (["--config.data_source=pipline"], "data_source must be one of pipeline, mixture, synthetic, got 'pipline'"),
], ids=["batch", "eval_batch", "num_devices", "attention", "grad_accum", "init_checkpoint", "dice", "data_source"])
def test_cli_config_mistakes_exit_2_before_the_workdir_exists(tmp_path, overrides, message):
    r = _train_cli(tmp_path / "run", *overrides, devices=2)
    assert r.returncode == 2 and f"radsam train: error: {message}" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--print-config", "--print_config"])
def test_print_config_shows_the_overridden_config_and_trains_nothing(tmp_path, flag):
    r = _train_cli(tmp_path / "run", "--config.seed=7", flag)
    assert r.returncode == 0 and "seed: 7" in r.stdout, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_cli_refuses_mri(tmp_path):
    r = _train_cli(tmp_path / "run", "--config.data.modality=all", "--config.data.root=/data/amos",
                   config="configs/train/amos_vit_b.py:runlocal")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "radsam train: error: data.modality 'all' with data.intensity 'hu'" in r.stderr and "Hounsfield" in r.stderr, r.stderr
    assert 'set data.modality="MRI" and data.intensity="percentile"' in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def _sweep(*argv):
    spec = importlib.util.spec_from_file_location("radsam_sweep", REPO / "launch" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep.main(list(argv))


@pytest.mark.parametrize("option", ["--grid=optim.learnin_rate=1e-5,3e-5", "--set=optim.learnin_rate=1e-5"])
def test_sweep_checks_override_keys_before_printing(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        _sweep("--mode", "local", "--config", str(REPO / "configs/train/example_cpu.py:runlocal"),
               "--root", str(tmp_path / "sweep"), option, "--dry-run")
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert "no key 'optim.learnin_rate'; did you mean optim.learning_rate" in err, err
    assert not (tmp_path / "sweep").exists()


def test_training_from_a_sam_conversion_records_binary_mask_prompts(tmp_path, monkeypatch):
    # A converted SAM reads its mask prompt as logits; the prompt simulation trains it on 0/1 masks,
    # which the run's model (hence its checkpoints and export) must say.
    import dataclasses

    import jax
    import numpy as np

    from radsam_jax.checkpoint import save_model
    from radsam_jax.model import abstract_variables, load_model_config
    from radsam_jax.train import loop

    sam = dataclasses.replace(load_model_config("small"), mask_prompt="logits")
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), abstract_variables(sam))
    save_model(tmp_path / "sam", sam, variables, {"source_format": "segment_anything"})
    c = apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")), [f"init_checkpoint={tmp_path / 'sam'}"])
    assert loop.configured_model_config(c).mask_prompt == "binary"
    assert loop.load_model(c)[0].mask_prompt == "binary"
    # On the command line a relative path is the current folder's, as for data.root (not the repo's).
    monkeypatch.chdir(tmp_path)
    c = apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")), ["init_checkpoint=sam"])
    assert c.init_checkpoint == str(tmp_path / "sam") and loop.load_model(c)[0].mask_prompt == "binary"
    # The checkpoint's weights fix the architecture: model.* may repeat it, never ask for another.
    same = apply_overrides(c, ["model.image_size=256", "model.global_attn_indexes=(2, 5)"])
    assert loop.configured_model_config(same).image_size == 256
    other = apply_overrides(c, ["model.image_size=128", "model.decoder_heads=4"])
    for build in (loop.configured_model_config, loop.load_model):
        with pytest.raises(ValueError, match=r"init_checkpoint .*sam fixes the architecture, but the config sets "
                                             r"model.decoder_heads=4 \(the checkpoint has 8\); model.image_size=128 "
                                             r"\(the checkpoint has 256\)"):
            build(other)


def test_sweep_dry_run_prints_each_run(tmp_path, capsys):
    assert _sweep("--mode", "local", "--config", str(REPO / "configs/train/example_cpu.py:runlocal"),
                  "--root", str(tmp_path), "--grid", "optim.learning_rate=1e-5,3e-5", "--set", "batch_size=4",
                  "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--config.batch_size=4" in line for line in lines), lines


def test_sweep_names_the_workdir_like_train_splits_the_config(tmp_path, capsys):
    folder = tmp_path / "run:1"  # a ":" before the variant's: both split at the last one
    folder.mkdir()
    shutil.copy(REPO / "configs/train/example_cpu.py", folder / "x.py")
    assert _sweep("--mode", "local", "--config", f"{folder / 'x.py'}:runlocal", "--root", str(tmp_path / "sweep"),
                  "--dry-run") == 0
    assert f"--workdir {tmp_path / 'sweep' / 'x_runlocal' / 'default'}" in capsys.readouterr().out


def test_sweep_shortens_over_long_workdir_names_and_refuses_a_key_without_values(tmp_path, capsys):
    grid = [f"--grid=optim.learning_rate={'0' * 30}1,2", f"--grid=seed={10**40},{10**40 + 1}",
            f"--grid=optim.warmup_steps={'1' * 150}"]  # names of 240-260 characters
    root = tmp_path / "sweep"
    assert _sweep("--mode", "local", "--config", str(REPO / "configs/train/example_cpu.py:runlocal"), "--root", str(root),
                  *grid, "--dry-run") == 0
    workdirs = [line.split("--workdir ")[1].split()[0] for line in capsys.readouterr().out.splitlines()]
    names = [pathlib.Path(w).name for w in workdirs]
    assert len(set(names)) == 4 and max(map(len, names)) == 200, names  # distinct, and short enough to create
    for w in workdirs:
        os.makedirs(w)
    with pytest.raises(SystemExit):
        _sweep("--mode", "local", "--config", str(REPO / "configs/train/example_cpu.py:runlocal"), "--root", str(root),
               "--grid", "optim.learning_rate=", "--dry-run")
    assert "--grid 'optim.learning_rate=': expected KEY=V1,V2,... with at least one value" in capsys.readouterr().err


def test_sweep_refuses_runs_that_would_share_a_workdir(tmp_path, capsys):
    """The workdir is ROOT/<config file stem>/<values>: two configs named alike, or a value given twice,
    would put two runs in one workdir (the second resuming the first's finished run, training nothing)."""
    other = tmp_path / "elsewhere" / "example_cpu.py"
    other.parent.mkdir()
    other.write_text((REPO / "configs/train/example_cpu.py").read_text())
    for configs, grid in (([REPO / "configs/train/example_cpu.py", other], "seed=0,1"),
                          ([REPO / "configs/train/example_cpu.py"], "seed=0,0")):
        with pytest.raises(SystemExit) as exit_info:
            _sweep("--mode", "local", *[a for c in configs for a in ("--config", str(c))], "--root", str(tmp_path / "sweep"),
                   "--grid", grid, "--dry-run")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"would share the workdir {tmp_path / 'sweep' / 'example_cpu' / 'seed=0'}" in err, err
    assert not (tmp_path / "sweep").exists()


def test_tpu_sweep_makes_nothing_on_this_machine(tmp_path, capsys, monkeypatch):
    """In tpu mode ROOT is a path on the TPU workers: tpu_pod.sh makes the workdirs there."""
    import subprocess

    started = []
    monkeypatch.setattr(subprocess, "call", lambda command: started.append(command) or 0)
    root = tmp_path / "on_the_workers" / "runs"
    assert _sweep("--mode", "tpu", "--tpu", "my-v4-8", "--zone", "us-central2-b", "--config",
                  "configs/train/example_cpu.py:runlocal", "--root", str(root), "--grid", "seed=0,1") == 0
    assert len(started) == 2 and all(c[0].endswith("tpu_pod.sh") for c in started), started
    assert not (tmp_path / "on_the_workers").exists()


@pytest.mark.parametrize("name", ["amos_vit_b", "totalseg_vit_b", "amos_totalseg_vit_b", "amos_mri_vit_b"])
def test_runlocal_shrinks_every_full_recipe_and_a_mistyped_variant_is_refused(name):
    full, smoke = (load_config_file(str(REPO / f"configs/train/{name}.py{arg}")) for arg in ("", ":runlocal"))
    assert (full.model.name, full.precision, full.batch_size) == ("vit_b", "bfloat16", 32)
    assert (smoke.model.name, smoke.init_checkpoint, smoke.precision, smoke.batch_size) == ("small", "", "float32", 2)
    assert [d.num_workers for d in [smoke.data, *smoke.get("datasets", {}).values()]] == [0] * (1 + len(full.get("datasets", {})))
    with pytest.raises(ConfigError, match="config variant 'runlocl' is not one of this file's: runlocal"):
        load_config_file(str(REPO / f"configs/train/{name}.py:runlocl"))


def test_fine_tuning_recipes_of_the_bundled_model():
    """example_cpu.py's runlocal would shrink the architecture that their init_checkpoint fixes: none."""
    path = str(REPO / "configs/train/example_cpu_finetune.py")
    longer, clicks = load_config_file(path), load_config_file(f"{path}:clicks")
    for c in (clicks, longer):
        assert (c.init_checkpoint, c.model.name, c.eval.at_start) == ("radsam_jax/assets/default_checkpoint", "small", True)
    assert (clicks.num_train_steps, clicks.data.prompts.mixture.mask_points, longer.num_train_steps) == (800, 0.4, 2500)
    assert longer.data.prompts.mixture == load_config_file(str(REPO / "configs/train/example_cpu.py")).data.prompts.mixture
    with pytest.raises(ConfigError, match="config variant 'runlocal' is not one of this file's: clicks"):
        load_config_file(f"{path}:runlocal")


@pytest.mark.parametrize("env, message", [
    ({"RADSAM_NUM_PROCESSES": "2", "RADSAM_PROCESS_ID": "3"},
     r"process_id 3 \(distributed_process_id / RADSAM_PROCESS_ID\) is not in 0..1"),
    ({"RADSAM_NUM_PROCESSES": "two"}, "distributed_num_processes / RADSAM_NUM_PROCESSES must be an integer, got 'two'"),
])
def test_topology_mistakes_are_config_errors(monkeypatch, env, message):
    from radsam_jax.train import loop
    from radsam_jax.train.config_lib import base_config

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        loop.distributed_arguments(base_config())


def test_distributed_without_a_coordinator_is_a_config_error(tmp_path):
    """Outside a cluster JAX detects, --config.distributed=True needs the topology: said as a config error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RADSAM_", "SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    config = str(REPO / "configs/train/example_cpu.py:runlocal")
    r = subprocess.run([sys.executable, "-m", "radsam_jax.cli", "train", "--config", config, "--workdir", str(tmp_path / "run"),
                        "--config.distributed=True"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "radsam train: error: cannot start the multi-process run:" in r.stderr, r.stderr
    assert "RADSAM_COORDINATOR_ADDRESS" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_training_intensity_and_window_are_the_models():
    from radsam_jax.train import loop

    c = apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")), ["data.window_level=60", "data.window_width=350"])
    assert loop.training_intensity(c) == ("hu", (60.0, 350.0))
    assert loop.configured_model_config(c).ct_window == (60.0, 350.0)
    assert loop.configured_model_config(load_config_file(str(REPO / "configs/train/example_cpu.py"))).ct_window == (40.0, 400.0)
    mri = loop.configured_model_config(load_config_file(str(REPO / "configs/train/amos_mri_vit_b.py:runlocal")))
    assert (mri.intensity, mri.ct_window) == ("percentile", (500.0, 1000.0))
    # A mixture whose datasets are windowed differently cannot record one window: a config error.
    mixed = apply_overrides(load_config_file(str(REPO / "configs/train/amos_totalseg_vit_b.py")), ["datasets.totalseg.window_level=60"])
    with pytest.raises(ConfigError, match="datasets.totalseg hu 60/400"):
        loop.check_config(mixed)
    mixed = apply_overrides(load_config_file(str(REPO / "configs/train/amos_totalseg_vit_b.py")),
                            ["datasets.amos.intensity=percentile"])
    with pytest.raises(ConfigError, match="datasets.amos percentile 40/400"):
        loop.check_config(mixed)
    zero = apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")), ["data.window_width=0"])
    with pytest.raises(ConfigError, match="width must be > 0"):
        loop.check_config(zero)
    unknown = apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")), ["data.intensity=zscore"])
    with pytest.raises(ConfigError, match="data.intensity 'zscore' is not one of hu, percentile"):
        loop.check_config(unknown)


@pytest.mark.parametrize("mixture, message", [
    ("(('amos', 0.5), ('totalsegmentator', 0.5))", "data_mixture names 'totalsegmentator', which datasets does not "
                                                  "define \\(it has 'amos', 'totalseg'\\)"),
    ("(('amos', 0.0), ('totalseg', 0.0))", "data_mixture weights must be >= 0 with a positive sum"),
    ("(('amos', -1.0), ('totalseg', 2.0))", "data_mixture weights must be >= 0 with a positive sum"),
    ("amos:0.7,totalseg:0.3", "data_mixture must be \\(name, weight\\) pairs, e.g. --config.data_mixture=\"\\(\\('amos', 0.7\\), "
                              "\\('totalseg', 0.3\\)\\)\", got \\(\\('amos:0.7',\\), \\('totalseg:0.3',\\)\\)"),
])
def test_a_mixture_of_unknown_datasets_or_without_weight_is_a_config_error(mixture, message):
    from radsam_jax.train import loop

    c = apply_overrides(load_config_file(str(REPO / "configs/train/amos_totalseg_vit_b.py")), [f"data_mixture={mixture}"])
    with pytest.raises(ConfigError, match=message):
        loop.check_config(c)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    from data_fixtures import write_amos, write_totalsegmentator

    root = tmp_path_factory.mktemp("roots")
    (root / "empty").mkdir()
    (root / "file").write_text("not a folder")
    return {"amos": str(write_amos(root / "amos")), "ts": str(write_totalsegmentator(root / "ts")),
            "empty": str(root / "empty"), "file": str(root / "file"), "missing": str(root / "missing")}


AMOS = "an AMOS folder (dataset.json, imagesTr/ and labelsTr/)"
TOTALSEG = "a TotalSegmentator folder (subject folders with ct.nii.gz and segmentations/, meta.csv)"


@pytest.mark.parametrize("config, overrides, message", [
    ("amos_vit_b", ["data.root="], f"data.root: not set; expected {AMOS}"),
    ("amos_vit_b", ["data.root={missing}"], f"data.root: {{missing}} does not exist; expected {AMOS}"),
    ("amos_vit_b", ["data.root={file}"], f"data.root: {{file}} is a file, not a folder; expected {AMOS}"),
    ("amos_vit_b", ["data.root={empty}"], f"data.root: {{empty}} is not {AMOS}"),
    ("totalseg_vit_b", ["data.root={amos}"], f"data.root: {{amos}} is not {TOTALSEG}"),
    ("amos_totalseg_vit_b", ["datasets.amos.root={amos}", "datasets.totalseg.root={empty}"],
     f"datasets.totalseg.root: {{empty}} is not {TOTALSEG}"),
    ("example_cpu", ["data.val_root={missing}"],
     "data.val_root: {missing} does not exist; expected a case folder with labels.json, or a folder of them"),
    ("example_cpu", ["data.cache_size=2"],
     "data.cache_size 2 is below data.cases_per_block 4: a worker's cache cannot hold the cases whose samples are "
     "shuffled together, so it decodes their volumes again and again; set data.cache_size >= data.cases_per_block"),
    ("amos_vit_b", ["data.root={amos}"], None),
    ("amos_mri_vit_b", ["data.root={amos}"], None),
    ("totalseg_vit_b", ["data.root={ts}"], None),
    ("amos_totalseg_vit_b", ["datasets.amos.root={amos}", "datasets.totalseg.root={ts}"], None),
], ids=["unset", "missing", "file", "no_layout", "other_layout", "mixture", "val_root", "small_cache", "amos", "amos_mri",
         "totalseg", "both"])
def test_dataset_folders_are_checked_with_the_config(roots, config, overrides, message):
    from radsam_jax.train import loop

    c = apply_overrides(load_config_file(str(REPO / "configs" / "train" / f"{config}.py")),
                        [o.format(**roots) for o in overrides])
    if message is None:
        loop.check_config(c)
    else:
        with pytest.raises(ConfigError) as error:
            loop.check_config(c)
        assert str(error.value) == message.format(**roots)


def test_cli_bad_dataset_folder_exits_2_before_the_workdir_exists(tmp_path):
    r = _train_cli(tmp_path / "run", f"--config.data.root={tmp_path / 'amos22'}", config="configs/train/amos_vit_b.py:runlocal")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"radsam train: error: data.root: {tmp_path / 'amos22'} does not exist; expected an AMOS folder" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_keeps_its_intensity_units():
    """Resuming may move the window (preprocessing) but not the units it is in: the input would change meaning."""
    from radsam_jax.train import loop

    def config(*overrides):
        return apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")), list(overrides))

    stored = loop.configured_model_config(config()).to_dict()

    class Checkpoints:  # a run with a checkpoint at step 5 that recorded `stored`
        directory = "runs/small/checkpoints"

        def latest_step(self):
            return 5

        def restore_model_config(self, step):
            return stored

    with pytest.raises(ConfigError, match=r"intensity 'hu' \(checkpoint\) != 'percentile' \(config\)"):
        loop.run_model(config("data.intensity=percentile"), Checkpoints())
    assert loop.run_model(config("data.window_level=60"), Checkpoints())[0].ct_window == (60.0, 400.0)


def test_volume_validation_needs_volumes():
    from radsam_jax.train import loop

    c = apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")),
                        ["data_source=synthetic", "eval.volume_cases=2"])
    with pytest.raises(ConfigError, match="eval.volume_cases 2: volume validation needs volumes"):
        loop.check_config(c)
    zero = apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")),
                           ["eval.volume_cases=2", "eval.volume_min_slices=0"])
    with pytest.raises(ConfigError, match="eval.volume_min_slices must be >= 1, got 0"):
        loop.check_config(zero)


def test_validation_on_the_training_cases_is_named(tmp_path):
    """A generic layout holds every case in every split unless splits.json or val_root says otherwise:
    the run names the validation cases it also trains on (a training-set validation)."""
    import json

    from data_fixtures import write_amos, write_generic
    from radsam_jax.train import loop

    def config(*overrides):
        return apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")), list(overrides))

    generic = write_generic(tmp_path / "generic", ("a", "b", "c"))
    assert loop.validation_overlap(config(f"data.root={generic}", "data.val_root=")) == ["a", "b", "c"]
    (generic / "splits.json").write_text(json.dumps({"train": ["a", "b"], "val": ["c"]}))
    assert loop.validation_overlap(config(f"data.root={generic}", "data.val_root=")) == []
    (generic / "splits.json").write_text(json.dumps({"train": ["a", "b"], "val": ["b", "c"]}))
    assert loop.validation_overlap(config(f"data.root={generic}", "data.val_root=")) == ["b"]
    held_out = write_generic(tmp_path / "held_out", ("d",))
    assert loop.validation_overlap(config(f"data.root={generic}", f"data.val_root={held_out}")) == []
    amos = write_amos(tmp_path / "amos")
    assert loop.validation_overlap(apply_overrides(load_config_file(str(REPO / "configs/train/amos_vit_b.py")),
                                                   [f"data.root={amos}"])) == []
    assert loop.validation_overlap(config("data_source=synthetic")) == []


def test_synthetic_shards_are_equal_so_no_process_steps_alone():
    """5 examples over 2 processes: 2 each (the fifth dropped), as the data pipeline shares its samples;
    a process with a batch more would wait for the others in that step's collectives."""
    from radsam_jax.model import ModelConfig
    from radsam_jax.train.synthetic import make_synthetic_iterator

    mc = ModelConfig(name="tiny", image_size=64)
    counts = [sum(1 for _ in make_synthetic_iterator(mc, split="train", batch_size=1, seed=0, num_examples=5,
                                                      shard_index=i, shard_count=2, num_epochs=1)) for i in range(2)]
    assert counts == [2, 2]
    with pytest.raises(ValueError, match="1 synthetic examples cannot be shared by 2 processes"):
        make_synthetic_iterator(mc, split="train", batch_size=1, seed=0, num_examples=1, shard_index=0, shard_count=2)


def test_num_devices_of_a_multi_process_run_must_be_all(monkeypatch):
    import jax

    from radsam_jax.train import loop

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    c = apply_overrides(load_config_file(str(REPO / "configs/train/example_cpu.py")), ["num_devices=4"])
    with pytest.raises(ConfigError, match=r"num_devices 4: a run of 2 processes uses all 8 devices \(-1\)"):
        loop.check_config(c)
