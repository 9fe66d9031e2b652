"""Ship decision of the built-in model: read the realtrain holdout of a training config with the shipped model
and a candidate, compare them crop by crop (never the benchmark crops).

    python benchmarks/holdout.py --config configs/tiny-builtin-continue.yaml \\
        --models builtin runs/tiny-builtin-stage12/final [--csv-dir DIR]
    python benchmarks/holdout.py --config configs/tiny-builtin-continue.yaml --models builtin@rescore=0 builtin

A model may carry decoding options after '@' (comma-separated key=value, 0/1 for booleans), so one model's
decoding choices are compared the same way.

For each model: word accuracy on each held-out set and together (36-character protocol, as `clip4str test`),
accuracy by label length, the confidence of right and wrong readings, and readings that repeat one character
5 or more times. With two models, the paired comparison: crops only one of them reads right, and the one-sided
exact McNemar p-value that the second is no better than the first. The rule (docs/training-builtin.md):
ship the second if it reads more crops right and p < 0.1.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from readings import paired, report

from clip4str.charset import CHARSETS
from clip4str.data.datamodule import Source, holdout_name, split_source
from clip4str.evaluate import Benchmark, label_at
from clip4str.inference import Recognizer
from clip4str.metrics import Scores
from clip4str.train.config import load_config


def holdout_benchmarks(config: str, charset: str, max_length: int) -> list[Benchmark]:
    """The held-out parts of the config's real sources, split exactly as training splits them."""
    sources = [Source(**s) for s in load_config(config).data.train]
    out = [Benchmark(holdout_name(s), split_source(s, charset, max_length)[1]) for s in sources
           if not s.is_synth and s.holdout]
    if not out:
        raise SystemExit(f"{config} holds out nothing (no data.train entry with holdout > 0)")
    return out


def decode_options(spec: str) -> tuple[str, dict]:
    """'MODEL@key=value,...' -> (MODEL, options); numbers become ints (0/1 for booleans)."""
    model, _, opts = spec.partition("@")
    options = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else None if value == "None" else value
    return model, options


def read_all(spec: str, config: str, csv_path: Path | None) -> list[dict]:
    """One row per held-out crop: set, label, reading, confidence, right (an unreadable crop reads as wrong)."""
    model, options = decode_options(spec)
    rec = Recognizer.from_pretrained(None if model == "builtin" else model)
    rows, images = [], []
    for bench in holdout_benchmarks(config, rec.config.charset, rec.config.max_label_length):
        for i in range(len(bench.data)):
            item = bench.data[i]
            rows.append({"set": bench.name, "index": i, "label": item[1] if item else label_at(bench.data, i)})
            images.append(item[0] if item else b"")
    scorer = Scores(CHARSETS["36"])
    for row, r in zip(rows, rec.read(images, batch_size=32, **options), strict=True):
        row.update(text=r.text, confidence=r.confidence,
                   right=scorer.update([r.text], [row["label"]], [r.confidence])[0])
    if csv_path:
        with csv_path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config whose data.train holdouts to read")
    ap.add_argument("--models", nargs="+", required=True, help="'builtin' or checkpoint folders (shipped first)")
    ap.add_argument("--csv-dir", type=Path, help="write each model's per-crop readings here")
    args = ap.parse_args()
    if len(args.models) > 2:
        ap.error("give one model, or the shipped model and one candidate")
    if args.csv_dir:
        args.csv_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for k, model in enumerate(args.models):
        csv_path = args.csv_dir / f"model{k}.csv" if args.csv_dir else None
        results.append(read_all(model, args.config, csv_path))
        report(model, results[-1])
    if len(results) == 2:
        paired(args.models[0], results[0], args.models[1], results[1])

if __name__ == "__main__":
    main()
