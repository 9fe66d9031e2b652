"""What a model's readings look like, from `clip4str test --csv` files: accuracy by label length, the confidence
of right and wrong readings, readings that run away; with two files of the same crops, the paired comparison.

    python benchmarks/readings.py before.csv [after.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics

from clip4str.metrics import LENGTH_BUCKETS, length_bucket, mcnemar_p
from clip4str.runaway import RUNAWAY_RUN, longest_run

SHIP_P = 0.1  # the ship rule's level (docs/training-builtin.md)


def accuracy(rows: list[dict]) -> str:
    return f"{100 * sum(r['right'] for r in rows) / len(rows):.1f}% ({sum(r['right'] for r in rows)}/{len(rows)})" \
        if rows else "-"


def report(name: str, rows: list[dict]) -> None:
    print(f"## {name}")
    for s in sorted({r["set"] for r in rows}):
        print(f"{s}: {accuracy([r for r in rows if r['set'] == s])}")
    print(f"all: {accuracy(rows)}")
    buckets = [f"{lo}-{hi}" if hi else f"{lo}+" for lo, hi in LENGTH_BUCKETS]
    print("by label length: " + ", ".join(f"{b}: {accuracy([r for r in rows if length_bucket(r['label']) == b])}"
                                          for b in buckets))
    for right in (True, False):
        conf = [r["confidence"] for r in rows if r["right"] == right]
        if conf:
            q = statistics.quantiles(conf, n=10) if len(conf) > 1 else conf * 9
            print(f"confidence of {'right' if right else 'wrong'} readings: median {statistics.median(conf):.3f}, "
                  f"10th percentile {q[0]:.3f}, 90th {q[-1]:.3f}")
    runaways = sum(longest_run(r["text"]) >= RUNAWAY_RUN > longest_run(r["label"]) for r in rows)
    print(f"readings with a run of {RUNAWAY_RUN}+ of one character not in the label: {runaways}")


def paired(name_a: str, a: list[dict], name_b: str, b: list[dict]) -> bool:
    """Print the crops only one of two models reads right and the one-sided exact McNemar p-value that B is no
    better than A; returns the ship rule's verdict for B (more crops right and p < SHIP_P)."""
    if [(r["set"], r["label"]) for r in a] != [(r["set"], r["label"]) for r in b]:
        raise SystemExit("the two runs did not read the same crops in the same order")
    wins = sum(y["right"] and not x["right"] for x, y in zip(a, b, strict=True))
    losses = sum(x["right"] and not y["right"] for x, y in zip(a, b, strict=True))
    p = mcnemar_p(wins, losses)
    ship = wins > losses and p < SHIP_P
    print(f"## paired: {name_b} right where {name_a} is wrong: {wins}; the reverse: {losses}; one-sided exact "
          f"McNemar p = {p:.3f} -> {'SHIP' if ship else 'do not ship'} (rule: more right and p < {SHIP_P})")
    return ship


def read_csv(path: str) -> list[dict]:
    """Rows of a `clip4str test --csv` file as report() takes them."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{"set": r["dataset"], "label": r["label"], "text": r["prediction"],
                 "confidence": float(r["confidence"]), "right": r["correct"] == "1"} for r in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="one or two files written by clip4str test --csv")
    args = ap.parse_args()
    runs = [read_csv(p) for p in args.csv[:2]]
    for path, rows in zip(args.csv, runs, strict=False):
        report(path, rows)
    if len(runs) == 2:
        paired(args.csv[0], runs[0], args.csv[1], runs[1])


if __name__ == "__main__":
    main()
