#!/usr/bin/env python
"""A sweep: one training run per (config, override set), each in its own workdir.

    # 3 learning rates x 2 warm-ups on Slurm: 6 sbatch jobs of launch/slurm_multinode.sbatch
    python launch/sweep.py --mode slurm --config configs/train/amos_vit_b.py --root /shared/runs/lr \
        --grid optim.learning_rate=1e-5,3e-5,1e-4 --grid optim.warmup_steps=0,250 \
        --set data.root=/shared/AMOS22 --set init_checkpoint=/shared/sam_vit_b_flax --dry-run

    # the same on a TPU pod slice, one run after the other (launch/tpu_pod.sh)
    python launch/sweep.py --mode tpu --tpu my-v4-32 --zone us-central2-b --config ... --root /mnt/shared/runs/lr ...

    # on this machine, one after the other (local) or as N processes each (local_multiprocess)
    python launch/sweep.py --mode local --config configs/train/example_cpu.py:runlocal --root /tmp/sweep \
        --grid optim.learning_rate=3e-4,1e-3

--grid KEY=V1,V2,... (repeatable) takes the Cartesian product; --set KEY=VALUE (repeatable) is applied
to every run; several --config files multiply the runs. Each run's workdir is
ROOT/<config name>/<key=value,...> (only the swept keys), so a re-submitted sweep resumes every run
from its own checkpoints. Every run's config and overrides are checked first (an unknown key or a bad
value is an error naming the close matches, as in `radsam train`), also with --dry-run, which then
prints the commands and starts nothing; otherwise ROOT/sweep.json lists the runs (not in tpu mode,
where ROOT is a path on the workers). Two runs that would share a workdir (configs of the same file
name, a value given twice) are an error.
"""

import argparse
import hashlib
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from radsam_jax.io import write_text_atomically
from radsam_jax.train.cli import build_config
from radsam_jax.train.config_lib import ConfigError, split_config_spec

LAUNCH = pathlib.Path(__file__).resolve().parent
MAX_NAME = 200  # characters of a run's directory name (each of sweep.json's runs lists its values in full)


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """["a.b=1,2", "c=x"] -> [("a.b", ["1", "2"]), ("c", ["x"])]. Values with commas inside brackets
    (tuples, lists) are kept whole: "model.global_attn_indexes=(1,),(0,1)" gives two values."""
    grid = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,...")
        key, values = item.split("=", 1)
        parts, depth, current = [], 0, ""
        for ch in values:
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += ch
        parts.append(current)
        values = [p.strip() for p in parts if p.strip()]
        if not key.strip() or not values:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... with at least one value")
        grid.append((key.strip(), values))
    return grid


def run_name(assignment: Sequence[tuple[str, str]]) -> str:
    """A directory name for the swept values, e.g. "optim.learning_rate=1e-4,optim.warmup_steps=0"."""
    if not assignment:
        return "default"
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(f"{k}={v}" for k, v in assignment))
    if len(text) > MAX_NAME:  # file systems refuse names over 255 bytes: a prefix + a hash of the whole
        text = f"{text[:MAX_NAME - 13]}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    return text


def config_name(config: str) -> str:
    path, arg = split_config_spec(config)
    return pathlib.Path(path).stem + (f"_{arg}" if arg else "")


def plan(configs: Sequence[str], grid, fixed: Sequence[str], root: str) -> list[dict]:
    """Every run: {"config", "workdir", "overrides"} (overrides as --config.KEY=VALUE tokens);
    ValueError naming both runs where two would share a workdir."""
    runs = []
    keys = [k for k, _ in grid]
    for config in configs:
        for values in itertools.product(*[v for _, v in grid]) if grid else [()]:
            assignment = list(zip(keys, values))
            workdir = os.path.join(root, config_name(config), run_name(assignment))
            overrides = [f"--config.{kv}" for kv in fixed] + [f"--config.{k}={v}" for k, v in assignment]
            runs.append({"config": config, "workdir": workdir, "overrides": overrides,
                         "swept": dict(assignment)})
    first = {}
    for run in runs:  # two runs in one workdir: the second would resume the first, or both write at once
        other = first.setdefault(os.path.normpath(run["workdir"]), run)
        if other is not run:
            raise ValueError(f"--config {other['config']} {run_name(list(other['swept'].items()))} and --config "
                             f"{run['config']} {run_name(list(run['swept'].items()))} would share the workdir "
                             f"{run['workdir']}: give the configs distinct file names or the grid distinct values, "
                             f"or sweep them under separate --root folders")
    return runs


def command(run: dict, args) -> list[str]:
    """The command that starts `run` in the chosen mode."""
    train_args = ["--config", run["config"], "--workdir", run["workdir"], *run["overrides"]]
    if args.mode == "slurm":
        name = f"{args.job_name}-{config_name(run['config'])}-{run_name(list(run['swept'].items()))}"[:120]
        return ["sbatch", f"--job-name={name}", f"--output={run['workdir']}/slurm-%j.out",
                *shlex.split(args.sbatch_args), args.sbatch_script, run["config"], run["workdir"], *run["overrides"]]
    if args.mode == "tpu":
        return [str(LAUNCH / "tpu_pod.sh"), args.tpu, args.zone, run["config"], run["workdir"], *run["overrides"]]
    train = shlex.split(args.train_cmd)
    if args.mode == "local":
        return [*train, *train_args]
    # local_multiprocess
    return [sys.executable, str(LAUNCH / "local_multiprocess.py"), "-n", str(args.num_processes),
            "-k", str(args.devices_per_process), "--", *train, *train_args]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--mode", choices=("slurm", "tpu", "local", "local_multiprocess"), default="slurm",
                        help="slurm: one sbatch job per run (in parallel); tpu / local / local_multiprocess: "
                             "one run after the other")
    parser.add_argument("--config", action="append", required=True, help="a configs/train/*.py[:arg] (repeatable)")
    parser.add_argument("--root", required=True, help="parent of the runs' workdirs (shared FS for slurm / tpu)")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... swept (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE applied to every run (repeatable)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the commands, start nothing")
    parser.add_argument("--sbatch_script", default=str(LAUNCH / "slurm_multinode.sbatch"), help="slurm: the job script")
    parser.add_argument("--sbatch_args", default="",
                        help="slurm: extra sbatch options, given with '=' as they start with --: "
                             "--sbatch_args='--nodes=2 --partition=gpu'")
    parser.add_argument("--job_name", default="radsam", help="slurm: job name prefix")
    parser.add_argument("--tpu", help="tpu: the TPU VM name")
    parser.add_argument("--zone", help="tpu: its zone")
    parser.add_argument("--train_cmd", default=f"{sys.executable} -m radsam_jax.train.cli",
                        help="local modes: the training command (default: this Python's radsam train)")
    parser.add_argument("-n", "--num_processes", type=int, default=2, help="local_multiprocess: processes per run")
    parser.add_argument("-k", "--devices_per_process", type=int, default=4, help="local_multiprocess: CPU devices each")
    parser.add_argument("--keep_going", action="store_true", help="sequential modes: go on after a failed run")
    args = parser.parse_args(argv)
    if args.mode == "tpu" and not (args.tpu and args.zone):
        parser.error("--mode tpu needs --tpu and --zone")
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected KEY=VALUE")

    try:
        runs = plan(args.config, parse_grid(args.grid), args.set, args.root)
    except ValueError as e:
        parser.error(str(e))
    for run in runs:
        # As `radsam train` will parse it: a bad key or value fails here, not in every submitted job.
        # tpu_pod.sh runs in the repository on the workers, so a relative config is the repository's.
        config = str(LAUNCH.parent / run["config"]) if args.mode == "tpu" else run["config"]
        try:
            build_config(config, run["overrides"])
        except ConfigError as e:
            parser.error(f"--config {run['config']}: {e}")
        run["command"] = command(run, args)
    if args.dry_run:
        for run in runs:
            print(shlex.join(run["command"]))
        return 0

    if args.mode != "tpu":  # tpu: ROOT is a path on the workers (tpu_pod.sh makes the workdirs there)
        os.makedirs(args.root, exist_ok=True)
        write_text_atomically(os.path.join(args.root, "sweep.json"), json.dumps({"mode": args.mode, "runs": runs}, indent=2))
    failures = 0
    for i, run in enumerate(runs):
        if args.mode != "tpu":  # slurm writes the job's log there before the run starts
            os.makedirs(run["workdir"], exist_ok=True)
        print(f"[sweep] run {i + 1}/{len(runs)}: {shlex.join(run['command'])}", flush=True)
        code = subprocess.call(run["command"])
        if code != 0:
            failures += 1
            print(f"[sweep] run {i + 1} failed with exit code {code}", flush=True)
            if args.mode == "slurm" or not args.keep_going:
                return code
    print(f"[sweep] {len(runs) - failures}/{len(runs)} runs {'submitted' if args.mode == 'slurm' else 'done'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
