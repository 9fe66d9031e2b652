"""Reading and training speed of the tiny and b16 presets, with the slower paths still in the code measured in
the same run, and the authors' published figures for B/16 beside them.

    python benchmarks/speed.py                       # tiny and b16, fp32 and bf16 (about 6 minutes on 2 cores)
    python benchmarks/speed.py --presets tiny --precision fp32

Reading: a 5-character word (max_length=5, no early exit, so an untrained model decodes exactly 5 characters
and EOS) through both branches with the default refinement; batch 1 latency and batch throughput.
"before" = the autoregressive loop that recomputes the whole prefix at every step (kv_cache=False, as the
authors' decoder does), and in bf16 fp32 weights that autocast rounds at every call; "after" = the cached
loop (the default) and, in bf16, weights stored once in bf16 as `Recognizer` does (the same numbers).
Training: one step of batch 8 (forward, six permutations, both branches, backward, AdamW); "before" =
PyTorch's default attention kernel choice, "after" = the math kernel clip4str train selects on CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from train_step import time_train_step

from clip4str import create_model
from clip4str.inference import store_matmul_weights_as

# The authors' CLIP4STR-B/16, random weights, 2 threads (REFERENCE.md; measured on a CPU about 2x faster
# than the 2-core EPYC this project's numbers come from).
AUTHORS_B16 = {("read b1 ms", "fp32"): 213.0, ("read b1 ms", "bf16"): 156.0, ("read img/s", "fp32"): 5.1,
               ("read img/s", "bf16"): 3.8, ("train s/step", "fp32"): 4.6, ("train s/step", "bf16"): 2.4}
READ_OPTIONS = {"max_length": 5, "early_exit": False}


def time_read(model: torch.nn.Module, batch: int, precision: str, kv_cache: bool, repeats: int) -> float:
    """Median seconds of decoding a batch of random images into 5 characters."""
    model.eval()
    h, w = model.config.image_size
    x = torch.randn(batch, 3, h, w)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model.decode(x, kv_cache=kv_cache, **READ_OPTIONS)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(preset: str, precision: str, repeats: int, batch: int) -> list[tuple[str, float, float]]:
    """(measure, before, after) rows for one preset and precision."""
    model = create_model(preset)
    reader = copy.deepcopy(model)
    if precision == "bf16":
        store_matmul_weights_as(reader, torch.bfloat16)
    rows = []
    b1 = [time_read(m, 1, precision, cache, repeats) * 1000 for m, cache in ((model, False), (reader, True))]
    rows.append(("read b1 ms", *b1))
    bn = [batch / time_read(m, batch, precision, cache, max(2, repeats // 5))
          for m, cache in ((model, False), (reader, True))]
    rows.append((f"read img/s (batch {batch})", *bn))
    steps = [time_train_step(model, 8, precision, steps=3, attention=a) for a in ("default", "math")]
    rows.append(("train s/step (batch 8)", *steps))
    return rows


def main() -> None:
    """Print the speed table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "b16"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=10, help="timed batch-1 reads (batched: a fifth, at least 2)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads} torch={torch.__version__}")
    print("| preset | precision | measure | before | after | speed-up | authors' B/16 | vs authors |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        batch = 64 if preset == "tiny" else 32
        for precision in args.precision:
            for name, before, after in measure(preset, precision, args.repeats, batch):
                lower_is_better = "img/s" not in name
                gain = before / after if lower_is_better else after / before
                ref = AUTHORS_B16.get((name.split(" (")[0], precision)) if preset == "b16" else None
                vs = "" if ref is None else f"{(ref / after if lower_is_better else after / ref):.2f}x"
                print(f"| {preset} | {precision} | {name} | {before:.3g} | {after:.3g} | {gain:.2f}x | "
                      f"{'' if ref is None else ref} | {vs} |", flush=True)


if __name__ == "__main__":
    main()
