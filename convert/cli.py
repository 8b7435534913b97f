"""`radsam convert SRC DST [--format ...] [--model ...]`: the command-line face of convert.py.

radsam_jax/cli.py registers it with `add_parser(subparsers)`; `python -m radsam_jax.convert.cli SRC DST`
runs it on its own.
"""

import argparse
import sys

from radsam_jax.cli import BAD_INPUT, reporting_errors


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `convert` subcommand; dispatch with `args.func(args)`."""
    from radsam_jax.convert.convert import FORMATS, MODELS
    from radsam_jax.model.config import MASK_PROMPT_ENCODINGS, PREPROCESSING_MODES

    parser = subparsers.add_parser(
        "convert",
        help="convert a SAM / MedSAM / Hugging Face SamModel checkpoint to a RadSAM checkpoint",
        description="Converts a PyTorch (.pth/.pt/.bin) or safetensors SAM-family checkpoint, or a Hugging Face "
        "model directory, into a RadSAM model checkpoint directory (Orbax + radsam.json).",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file or Hugging Face model directory")
    parser.add_argument("dst", metavar="DST", help="output directory (must not exist)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="key naming of SRC (default: detect from the keys)")
    parser.add_argument("--model", choices=MODELS, default="auto", help="architecture (default: infer from the tensor shapes)")
    parser.add_argument("--preprocessing", choices=PREPROCESSING_MODES, default="sam",
                        help="input pipeline the weights were trained with: medsam for MedSAM checkpoints (default: sam)")
    parser.add_argument("--mask-prompt", choices=MASK_PROMPT_ENCODINGS, default="logits",
                        help="how the weights were trained to read a mask prompt: logits (SAM's previous low-resolution "
                        "logits; SAM, MedSAM, SamModel) or binary (0/1 masks, checkpoints trained the RadSAM way) "
                        "(default: logits)")
    parser.add_argument("--decoder-heads", type=int, metavar="N",
                        help="mask decoder attention heads of an inferred model, which no tensor's shape tells "
                        "(default: a Hugging Face config.json's, else SAM's 8)")
    parser.set_defaults(func=run)
    return parser


@reporting_errors
def run(args: argparse.Namespace) -> int:
    """Converts; a bad source or destination prints `radsam convert: error: ...` and exits with status 2."""
    from radsam_jax.convert.convert import convert_checkpoint

    try:
        model = convert_checkpoint(args.src, args.dst, format=args.format, model=args.model, preprocessing=args.preprocessing,
                                   mask_prompt=args.mask_prompt, decoder_heads=args.decoder_heads)
    except OSError as e:
        if isinstance(e, BAD_INPUT):
            raise
        # a write that failed after all (a read-only or full disk): nothing is left at DST
        raise RuntimeError(f"writing {args.dst} failed: {e}") from e
    c = model.config
    print(
        f"converted {args.src} -> {args.dst}: {c.name} ({model.num_params():,} parameters, "
        f"{c.image_size}x{c.image_size} input, {model.metadata['source_format']} format, {c.preprocessing} preprocessing, {c.mask_prompt} mask prompts"
        + (f", {c.decoder_heads} decoder heads ({model.metadata['decoder_heads_from']})"
           if "decoder_heads_from" in model.metadata else "") + ")"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="radsam")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
