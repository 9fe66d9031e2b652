"""Contact sheet of synthetic training words beside real crops, at the model's input size (docs/synth-vs-real.png).

    python scripts/synth_sheet.py [--real ../shared/realtrain/lmdb] [--out docs/synth-vs-real.png] [--seed 0]

Left: synthetic words as `clip4str train` draws them (full difficulty); right: real training crops. Each tile is
the 32x128 image the model sees, with its label.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clip4str.data.lmdb import lmdb_dataset
from clip4str.data.synth import WordRenderer

TILE_W, TILE_H, CAPTION = 128, 32, 14


def sheet(tiles: list[tuple[Image.Image, str]], columns: int) -> Image.Image:
    """Tiles resized to the model input, each with its label beneath, in a grid."""
    rows = (len(tiles) + columns - 1) // columns
    out = Image.new("RGB", (columns * (TILE_W + 4) + 4, rows * (TILE_H + CAPTION + 4) + 4), "white")
    draw, font = ImageDraw.Draw(out), ImageFont.load_default(size=11)
    for k, (image, label) in enumerate(tiles):
        x, y = 4 + (k % columns) * (TILE_W + 4), 4 + (k // columns) * (TILE_H + CAPTION + 4)
        out.paste(image.convert("RGB").resize((TILE_W, TILE_H), Image.Resampling.BICUBIC), (x, y))
        draw.text((x, y + TILE_H + 1), label[:22], fill="black", font=font)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", default="../shared/realtrain/lmdb")
    ap.add_argument("--out", default="docs/synth-vs-real.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=48, help="tiles of each kind")
    args = ap.parse_args()
    renderer = WordRenderer(seed=args.seed)
    synthetic = [renderer.render(i) for i in range(args.count)]
    real_data = lmdb_dataset(args.real)
    picks = np.random.default_rng(args.seed).choice(len(real_data), args.count, replace=False)
    real = [item for item in (real_data[int(i)] for i in picks) if item is not None]
    left, right = sheet(synthetic, 3), sheet(real, 3)
    out = Image.new("RGB", (left.width + right.width + 24, max(left.height, right.height) + 24), "white")
    draw = ImageDraw.Draw(out)
    draw.text((6, 4), "synthetic (clip4str.data.synth)", fill="black", font=ImageFont.load_default(size=14))
    draw.text((left.width + 30, 4), "real training crops", fill="black", font=ImageFont.load_default(size=14))
    out.paste(left, (0, 24))
    out.paste(right, (left.width + 24, 24))
    out.save(args.out)
    print(f"wrote {args.out}: {len(synthetic)} synthetic, {len(real)} real tiles")


if __name__ == "__main__":
    main()
