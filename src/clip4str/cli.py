"""`clip4str` command line: read images, list presets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from clip4str.data.cli import add_data_commands
from clip4str.data.transforms import ImageDecodeError, preprocess
from clip4str.factory import create_model
from clip4str.model import CLIP4STR
from clip4str.presets import list_presets
from clip4str.weights import load_model


def _model(args: argparse.Namespace) -> CLIP4STR:
    if args.model:
        return load_model(args.model)
    print(f"warning: no --model given and no built-in model exists yet: reading with a RANDOMLY INITIALISED, "
          f"UNTRAINED '{args.preset}' model (seed {args.seed}); its text is meaningless", file=sys.stderr)
    torch.manual_seed(args.seed)
    return create_model(args.preset).eval()


def cmd_read(args: argparse.Namespace) -> int:
    """Print path<TAB>text<TAB>confidence for each image; failures go to stderr and set exit status 1."""
    model = _model(args)
    cfg = model.config
    failed = 0
    for path in args.images:
        try:
            x = preprocess(path, cfg.image_size, cfg.image_mean, cfg.image_std)
        except ImageDecodeError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        result = model.read(x, mode=args.mode, refine_iters=args.refine_iters)[0]
        print(f"{path}\t{result.text}\t{result.confidence:.4f}")
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) an experiment and print where the result is."""
    from clip4str.train.config import load_config
    from clip4str.train.run import train

    result = train(load_config(args.config, args.overrides), resume=args.resume)
    print(f"result: {result}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """List model presets with their parameter counts."""
    for name in list_presets():
        model = create_model(name)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        h, w = model.config.image_size
        print(f"{name}\t{h}x{w}\t{total / 1e6:.1f}M params\t{trainable / 1e6:.1f}M trainable")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="clip4str", description="CLIP4STR scene text recognition")
    sub = parser.add_subparsers(dest="command", required=True)
    read = sub.add_parser("read", help="read the text in cropped word images")
    read.add_argument("images", nargs="+", type=Path, help="image files")
    read.add_argument("--model", type=Path, help="checkpoint folder (config.json + model.safetensors)")
    read.add_argument("--preset", default="tiny", choices=list_presets(), help="preset of the untrained fallback")
    read.add_argument("--seed", type=int, default=0, help="seed of the untrained fallback")
    read.add_argument("--mode", choices=["ar", "nar"], default=None, help="decoding mode (default: model's)")
    read.add_argument("--refine-iters", type=int, default=None, help="refinement passes (default: model's)")
    read.set_defaults(func=cmd_read)
    presets = sub.add_parser("presets", help="list model presets")
    presets.set_defaults(func=cmd_presets)
    add_data_commands(sub)
    train = sub.add_parser("train", help="train or fine-tune a model from a YAML experiment config")
    train.add_argument("--config", type=Path, help="experiment YAML (see configs/)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.ckpt")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clip4str` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
