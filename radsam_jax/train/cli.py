"""`radsam train --config configs/train/NAME.py --workdir DIR [--config.key=value ...]`.

`radsam_jax/cli.py` (the `radsam` command) calls `add_parser(subparsers)`; `python -m radsam_jax.train.cli ...`
runs the same command without the top-level CLI. Overrides follow ml_collections.config_flags:
`--config.optim.learning_rate=1e-4` or `--config.optim.learning_rate 1e-4`; a key that does not
exist is an error listing the closest keys; values take the type of the existing field.
"""

import argparse
import signal
import sys
from typing import Optional, Sequence

from radsam_jax.train.config_lib import ConfigError, apply_overrides, load_config_file

HELP = "train or fine-tune RadSAM (resumes from WORKDIR/checkpoints if present)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `train` sub-command to an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser("train", help=HELP, description=HELP)
    _add_arguments(parser)
    parser.set_defaults(func=run)
    _collect_config_overrides(parser)
    return parser


def _collect_config_overrides(parser: argparse.ArgumentParser) -> None:
    """Makes `parser` keep `--config.key=value` / `--config.key value` tokens in `args.overrides`
    instead of reporting them as unrecognised (argparse cannot declare options it only learns from
    the config file), so the top-level CLI can keep using plain `parse_args()`."""
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = original(args, namespace)
        overrides, rest, i = [], [], 0
        while i < len(extras):
            tok = extras[i]
            if tok.startswith("--config."):
                overrides.append(tok)
                if "=" not in tok and i + 1 < len(extras) and not extras[i + 1].startswith("--"):
                    overrides.append(extras[i + 1])
                    i += 1
            else:
                rest.append(tok)
            i += 1
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, rest

    parser.parse_known_args = parse_known_args


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="a configs/train/*.py file (optionally file.py:arg for get_config(arg))")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard events go here")
    parser.add_argument("--print-config", "--print_config", dest="print_config", action="store_true",
                        help="print the final config and exit")
    parser.epilog = "override any config value with --config.KEY=VALUE (e.g. --config.optim.learning_rate=1e-4)"


def parse_overrides(tokens: Sequence[str]) -> list[str]:
    """["--config.a.b=1", "--config.c", "2"] -> ["a.b=1", "c=2"]; anything else is a ConfigError."""
    out, i, tokens = [], 0, list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--config."):
            raise ConfigError(f"unexpected argument {tok!r}; overrides look like --config.optim.learning_rate=1e-4")
        body = tok[len("--config."):]
        if "=" not in body:
            if i + 1 >= len(tokens):
                raise ConfigError(f"{tok} needs a value")
            body, i = f"{body}={tokens[i + 1]}", i + 1
        out.append(body)
        i += 1
    return out


def build_config(config_path: str, override_tokens: Sequence[str]):
    config = load_config_file(config_path)
    apply_overrides(config, parse_overrides(override_tokens))
    return config


def run(args: argparse.Namespace) -> int:
    """Runs `radsam train`; returns the process exit code (0 also after a clean SIGTERM stop, 130 after
    a Ctrl-C stop, saved as well: a chained `&& radsam export` does not go on; 2 for a config mistake,
    found before the workdir is written to where possible)."""
    tokens = list(getattr(args, "overrides", None) or [])
    try:
        config = build_config(args.config, tokens)
        if args.print_config:
            print(config)
            return 0
        from radsam_jax.train.loop import train_and_evaluate

        result = train_and_evaluate(config, args.workdir)
    except ConfigError as e:
        print(f"radsam train: error: {e}", file=sys.stderr)
        return 2
    if result.get("signal") == signal.SIGINT:
        return 130
    return 0 if result.get("step") is not None else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="radsam train", description=HELP)
    _add_arguments(parser)
    _collect_config_overrides(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
