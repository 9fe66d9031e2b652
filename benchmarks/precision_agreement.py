"""How often bf16 reads the same text as fp32: the rule for making bf16 the CPU default is >= 99.5%.

    python benchmarks/precision_agreement.py ../shared/realdata [--model runs/x/final]

Reads every image with both precisions through the same evaluation path as `clip4str test` and prints the
share of identical texts (raw, case-sensitive), each precision's accuracy (36-character protocol) and its
time per image.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import torch

from clip4str.charset import CHARSETS
from clip4str.evaluate import collect_benchmarks, run_benchmarks
from clip4str.inference import Recognizer


def predictions(model: str | None, data: list[str], precision: str, batch_size: int, out: Path
                ) -> tuple[list[str], float, float]:
    """(texts in order, Combined accuracy %, ms per image) for one precision."""
    rec = Recognizer.from_pretrained(model, precision=precision)
    benches = collect_benchmarks(data, CHARSETS["36"])
    rows, ms = run_benchmarks(rec, benches, CHARSETS["36"], batch_size, csv_path=out)
    correct = sum(s.correct for _, s in rows)
    total = sum(s.n for _, s in rows)
    with open(out, encoding="utf-8") as f:
        texts = [row["prediction"] for row in csv.DictReader(f)]
    return texts, 100.0 * correct / max(total, 1), ms


def main() -> None:
    """Print how often bf16 reads the same text as fp32."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", help="LMDB roots or labels.tsv folders")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, acc32, ms32 = predictions(args.model, args.data, "fp32", args.batch_size, Path(tmp) / "fp32.csv")
        bf16, acc16, ms16 = predictions(args.model, args.data, "bf16", args.batch_size, Path(tmp) / "bf16.csv")
    same = sum(a == b for a, b in zip(fp32, bf16, strict=True))
    print(f"images: {len(fp32)}; identical text: {same} ({100.0 * same / max(len(fp32), 1):.2f}%)")
    print(f"fp32: accuracy {acc32:.2f}%, {ms32:.2f} ms/image (batch {args.batch_size})")
    print(f"bf16: accuracy {acc16:.2f}%, {ms16:.2f} ms/image (batch {args.batch_size})")


if __name__ == "__main__":
    main()
