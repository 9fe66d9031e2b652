"""Synthetic word images per second on one core, for 32x128 model crops.

    python benchmarks/synth_speed.py [--count 3000] [--warmup 2000] [--fonts DIR ...]

Runs in one process (one core). Warm-up renders first so that the font and background caches are filled,
as they are in a long training run; the timed part renders and resizes to 32x128 (bicubic).
"""

from __future__ import annotations

import argparse
import os
import time

from PIL import Image

from clip4str.data.synth import WordRenderer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--fonts", nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as a data-loader worker has
    t0 = time.perf_counter()
    renderer = WordRenderer(fonts=args.fonts, seed=args.seed)
    print(f"init {time.perf_counter() - t0:.1f}s: {len(renderer.fonts)} fonts, "
          f"{len(renderer.backgrounds.photos)} background photos, {len(renderer.words.words)} words")
    for i in range(args.warmup):
        renderer[i]
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for i in range(args.warmup, args.warmup + args.count):
        renderer[i][0].resize((128, 32), Image.Resampling.BICUBIC)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    print(f"{args.count} images: {args.count / wall:.0f} images/s wall, {args.count / cpu:.0f} images/s per CPU "
          f"second ({1000 * cpu / args.count:.2f} ms CPU each)")


if __name__ == "__main__":
    main()
