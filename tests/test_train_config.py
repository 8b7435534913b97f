"""Training configs: every configs/train file loads, overrides take the field's type, and a key
that does not exist is a clear error naming the closest keys (in-process, no training)."""

import argparse
import pathlib
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
