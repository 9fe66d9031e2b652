"""`clip4str data lmdb | inspect | synth`: build, look at and generate datasets."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from clip4str.argtypes import non_negative_int, positive_int
from clip4str.charset import CHARSETS, LabelNormalizer, resolve_charset
from clip4str.data.folder import LABELS_NAME, read_label_file
from clip4str.data.lmdb import write_lmdb
from clip4str.data.sources import dataset_labels, open_labelled


def _labelled_source(src: Path) -> Iterator[tuple[str, str, str]]:
    label_file = src / LABELS_NAME if src.is_dir() else src
    for path, label in read_label_file(label_file):
        yield str(path), str(path), label


def cmd_lmdb(args: argparse.Namespace) -> int:
    """Folder with labels.tsv (or a path<TAB>label list) -> LMDB."""
    report = write_lmdb(_labelled_source(args.src), args.out, force=args.force)
    print(f"wrote {report.written} samples to {args.out}; skipped {len(report.skipped)}")
    for name, reason in report.skipped[:20]:
        print(f"  skipped {name}: {reason}", file=sys.stderr)
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more", file=sys.stderr)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Render N synthetic words into an LMDB (PNG-encoded)."""
    import io

    from clip4str.data.synth import WordRenderer

    charset = resolve_charset(args.charset)
    if not charset.strip():
        raise ValueError(f"--charset {args.charset!r} holds no character to draw; give 36, 62, 94, the characters "
                         "themselves or a file of them")
    renderer = WordRenderer(charset, args.fonts, args.backgrounds, seed=args.seed)
    start = time.perf_counter()

    def samples() -> Iterator[tuple[str, bytes, str]]:
        for i in range(args.count):
            image, label = renderer[i]
            buf = io.BytesIO()
            image.save(buf, "PNG", compress_level=1)
            yield f"synth-{i}", buf.getvalue(), label

    report = write_lmdb(samples(), args.out, force=args.force)
    elapsed = time.perf_counter() - start
    print(f"wrote {report.written} synthetic words to {args.out} in {elapsed:.1f}s "
          f"({report.written / elapsed:.0f}/s incl. PNG + LMDB); {len(renderer.fonts)} fonts, "
          f"{len(renderer.backgrounds.photos)} background photos")
    return 0


def contact_sheet(items: list[tuple[Image.Image, str]], columns: int = 4,
                  cell: tuple[int, int] = (192, 48)) -> Image.Image:
    """Crops resized to a cell with their labels written below each."""
    w, h = cell
    rows = (len(items) + columns - 1) // columns
    font = ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (columns * (w + 8), rows * (h + 22)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, label) in enumerate(items):
        x, y = (k % columns) * (w + 8) + 4, (k // columns) * (h + 22) + 2
        sheet.paste(image.convert("RGB").resize(cell, Image.Resampling.BICUBIC), (x, y))
        draw.text((x, y + h + 2), label, fill=(180, 0, 0), font=font)
    return sheet


def cmd_inspect(args: argparse.Namespace) -> int:
    """Count, label lengths, charset coverage, samples, optional contact sheet."""
    if args.grid and args.grid.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
        raise ValueError(f"--grid {args.grid}: give a .png (or .jpg, .webp) file name")
    data = open_labelled(args.path, None)
    labels = dataset_labels(data)
    charset = resolve_charset(args.charset)
    print(f"{args.path}: {len(labels)} samples")
    lengths = Counter(len(t) for t in labels)
    top = max(lengths.values(), default=1)
    print("label length histogram:")
    for n in sorted(lengths):
        print(f"  {n:3d} {lengths[n]:7d} {'#' * max(1, round(40 * lengths[n] / top))}")
    # The labels as training and `clip4str test` read them: whitespace, NFKD to ASCII, length limit, charset.
    normalizer = LabelNormalizer(charset, args.max_length)
    for t in labels:
        normalizer(t)
    outside = normalizer.adapter.dropped
    print(f"as read for a model of {len(charset)} characters and at most {args.max_length} per label (case folded "
          f"where the charset has one case): labels {normalizer.stats.summary()}"
          + (f"; characters dropped: {' '.join(f'{c!r}x{n}' for c, n in outside.most_common(15))}" if outside else ""))
    step = max(1, len(labels) // args.samples)
    picks = list(range(0, len(labels), step))[: args.samples]
    print("samples: " + ", ".join(repr(labels[i]) for i in picks))
    if args.grid:
        step = max(1, len(labels) // args.grid_count)
        items = [item for item in (data[i] for i in range(0, len(labels), step)[: args.grid_count]) if item]
        contact_sheet(items).save(args.grid)
        print(f"contact sheet of {len(items)} samples: {args.grid}")
    return 0


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """Register `clip4str data ...`."""
    data = sub.add_parser("data", help="build, inspect and generate datasets").add_subparsers(dest="data_command",
                                                                                           required=True)
    lm = data.add_parser("lmdb", help="folder with labels.tsv (or a path<TAB>label file) -> LMDB")
    lm.add_argument("src", type=Path)
    lm.add_argument("out", type=Path)
    lm.add_argument("--force", action="store_true", help="replace OUT if it exists")
    lm.set_defaults(func=cmd_lmdb)
    ins = data.add_parser("inspect", help="count, label lengths, charset coverage and samples of a dataset")
    ins.add_argument("path", type=Path, help="LMDB root or folder with labels.tsv")
    ins.add_argument("--charset", default="94", help="charset to check coverage against (36|62|94|string|file)")
    ins.add_argument("--max-length", type=positive_int, default=25, help="the model's label length limit")
    ins.add_argument("--samples", type=positive_int, default=12)
    ins.add_argument("--grid", type=Path, help="save a contact sheet PNG of samples with labels")
    ins.add_argument("--grid-count", type=positive_int, default=48)
    ins.set_defaults(func=cmd_inspect)
    sy = data.add_parser("synth", help="render synthetic word images into an LMDB")
    sy.add_argument("out", type=Path)
    sy.add_argument("--count", type=positive_int, required=True)
    sy.add_argument("--seed", type=non_negative_int, default=0)
    sy.add_argument("--charset", default=CHARSETS["94"])
    sy.add_argument("--fonts", nargs="+", help="font folders (default: system font folders, $CLIP4STR_FONTS)")
    sy.add_argument("--backgrounds", nargs="+", help="photo folders (default: /usr/share/backgrounds ...)")
    sy.add_argument("--force", action="store_true")
    sy.set_defaults(func=cmd_synth)
