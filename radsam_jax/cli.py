"""`radsam` command line: one subcommand per job, each defined beside the code it drives.

Subcommand modules expose `add_parser(subparsers)`, which registers the parser and sets `func`.
They are imported lazily so `radsam --help` stays fast and a missing optional extra (torch for
`convert`) only matters for the command that needs it.
"""

import argparse
import functools
import importlib
import sys
import warnings
from pathlib import Path

SUBCOMMAND_MODULES = (
    "radsam_jax.convert.cli",
    "radsam_jax.train.cli",
    "radsam_jax.train.export",
    "radsam_jax.inference.cli",
    "radsam_jax.evaluate.cli",
)


class InputError(ValueError):
    """Bad command-line input (an option, a path, a value): `radsam CMD: error: ...`, exit status 2."""


# The user's to fix: ValueError covers the project's input errors (InputError, CheckpointError, ConfigError,
# PromptError, ...), the OSErrors name the user's paths, ImportError a missing extra. Any other OSError
# (a full disk) or a RuntimeError is a failure of the run itself.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
             ImportError)


def reporting_errors(function):
    """A subcommand's run(args) whose expected errors print as one line on stderr, no traceback: bad
    input (BAD_INPUT) exits 2, a failure of the run (RuntimeError, another OSError) exits 1."""

    @functools.wraps(function)
    def run(args) -> int:
        try:
            return function(args)
        except BAD_INPUT as e:
            print(f"radsam {args.command}: error: {e}", file=sys.stderr)
            return 2
        except (RuntimeError, OSError) as e:
            print(f"radsam {args.command}: error: {e}", file=sys.stderr)
            return 1

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radsam",
        description="RadSAM in JAX: convert SAM checkpoints, train, segment CT volumes, evaluate.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def _one_line_warnings(command: str):
    """radsam-jax's own warnings as "radsam CMD: warning: ..." lines, like its errors (not Python's
    file, line and source line); other libraries' keep Python's form. Returns the formatter it
    replaced, for main to put back (callers in one process, tests, would stack wrappers)."""
    ours, default = str(Path(__file__).parent), warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if category is UserWarning and str(filename).startswith(ours):
            return f"radsam {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    return default


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from radsam_jax.compilation_cache import enable_compilation_cache

    enable_compilation_cache()
    previous = _one_line_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # subcommands that keep work (evaluate, segment-batch, train) say more themselves
        print(f"radsam {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    sys.exit(main())
