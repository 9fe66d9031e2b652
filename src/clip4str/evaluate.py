"""Benchmark runner: datasets -> predictions -> the reference metrics table (one path for every model)."""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from clip4str.charset import LabelNormalizer
from clip4str.data.compat import Dataset, Subset
from clip4str.data.folder import FolderDataset
from clip4str.data.lmdb import LmdbDataset, find_lmdbs, image_key
from clip4str.metrics import Scores
from clip4str.reading import ReadResult


@dataclass
class Benchmark:
    """A named dataset to score."""

    name: str
    data: Dataset


def collect_benchmarks(paths: list[str | Path], charset: str, by_folder: bool = False,
                       max_length: int = 25) -> list[Benchmark]:
    """LMDB roots (each LMDB reported on its own) and labels.tsv folders (sub-folders with `by_folder`).

    Labels follow the reference test protocol: normalised for the test charset, longer than `max_length`
    or empty after filtering means not scored.
    """
    out: list[Benchmark] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"dataset {str(p)!r} does not exist")
        if (p / "labels.tsv").is_file():
            ds = FolderDataset(p, LabelNormalizer(charset, max_length), report=False)
            if not by_folder:
                out.append(Benchmark(p.resolve().name, ds))  # '.' has no name of its own
                continue
            groups: dict[str, list[int]] = {}
            for i in range(len(ds)):
                groups.setdefault(ds.group(i), []).append(i)
            names = _group_names(list(groups), p.resolve().name)
            out.extend(Benchmark(names[g], Subset(ds, idx)) for g, idx in sorted(groups.items()))
        else:
            for db in find_lmdbs(p):
                name = str(db.relative_to(p)) if db != p else p.resolve().name
                out.append(Benchmark(name, LmdbDataset(db, LabelNormalizer(charset, max_length))))
    return out


def _group_names(groups: list[str], root_name: str) -> dict[str, str]:
    """Sub-folders named by their path below the folders they all share (images/cute80, images/svt: cute80, svt;
    a/x and b/x stay apart); images beside labels.tsv by the dataset's own name."""
    common = os.path.commonpath(groups) if len(groups) > 1 else os.path.dirname(groups[0])
    names = {}
    for g in groups:
        rel = os.path.relpath(g, common or ".")
        names[g] = root_name if g == "." else Path(g).name if rel == "." else Path(rel).as_posix()
    if len(set(names.values())) < len(names):  # a/x beside a/x/x: the whole paths
        names = {g: root_name if g == "." else Path(g).as_posix() for g in groups}
    return names


# The reading of a sample its dataset could not load (the dataset's warning says why).
UNLOADED = ReadResult("", 0.0, [], "the image could not be loaded from the dataset; counted as wrong")


def run_benchmarks(recognizer, benchmarks: list[Benchmark], charset: str, batch_size: int = 32,
                   csv_path: str | Path | None = None, progress=None, unloaded: list[str] | None = None,
                   **decode_options: object) -> tuple[list[tuple[str, Scores]], float]:
    """Score every benchmark; returns rows and milliseconds per image. Unreadable images count as wrong (their
    sources, and the reader's reason where it refused one, are appended to `unloaded`). `decode_options` go to
    every read (e.g. guard=False)."""
    rows, seconds, images = [], 0.0, 0
    writer, handle = None, None
    if csv_path:
        handle = open(csv_path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed below
        writer = csv.writer(handle)
        writer.writerow(["dataset", "index", "label", "prediction", "confidence", "correct", "error", "source"])
    try:
        for bench in benchmarks:
            scores = Scores(charset)
            for start in range(0, len(bench.data), batch_size):
                span = range(start, min(start + batch_size, len(bench.data)))
                items = [bench.data[i] for i in span]
                # A sample that failed to load keeps its real label, so its empty reading counts as wrong.
                labels = [it[1] if it is not None else label_at(bench.data, i)
                          for it, i in zip(items, span, strict=True)]
                t0 = time.perf_counter()
                readable = iter(recognizer.read([it[0] for it in items if it is not None], batch_size=batch_size,
                                                **decode_options))
                seconds += time.perf_counter() - t0
                results = [next(readable) if it is not None else UNLOADED for it in items]
                images += len(items)
                if unloaded is not None:  # not loaded, or loaded but refused by the reader (too many windows)
                    unloaded += [f"{bench.name}/{sample_source(bench.data, i)}" + (f": {r.error}" if it else "")
                                 for it, r, i in zip(items, results, span, strict=True) if it is None or r.error]
                hits = scores.update([r.text for r in results], labels, [r.confidence for r in results])
                if writer:
                    for k, (r, label, hit) in enumerate(zip(results, labels, hits, strict=True)):
                        writer.writerow([bench.name, start + k, label, r.text, f"{r.confidence:.6f}", int(hit),
                                         r.error or "", sample_source(bench.data, start + k)])
                if progress:
                    progress(len(items))
            rows.append((bench.name, scores))
    finally:
        if handle:
            handle.close()
    return rows, 1000.0 * seconds / max(images, 1)


def sample_source(data: Dataset, index: int) -> str:
    """Where sample `index` comes from: its file (relative to the folder) or its LMDB image key."""
    if isinstance(data, Subset):
        return sample_source(data.dataset, data.indices[index])
    if isinstance(data, FolderDataset):
        return os.path.relpath(data.paths[index], data.root)
    if isinstance(data, LmdbDataset):
        return image_key(data.keys[index]).decode()
    return ""


def label_at(data: Dataset, index: int) -> str:
    """The (normalised) label of sample `index` without decoding its image."""
    if isinstance(data, Subset):
        return label_at(data.dataset, data.indices[index])
    return data.labels[index]


def format_table(rows: list[tuple[str, Scores]], charset: str, fmt: str = "md") -> str:
    """Dataset | # samples | Accuracy | 1 - NED | Confidence | Label length, with a sample-weighted Combined row."""
    combined = Scores(charset)
    for _, s in rows:
        combined.merge(s)
    table = [*rows, ("Combined", combined)]
    if fmt == "json":
        return json.dumps([{"dataset": n, "samples": s.n, "accuracy": round(s.accuracy, 2),
                            "one_minus_ned": round(s.one_minus_ned, 2), "confidence": round(s.confidence, 2),
                            "label_length": round(s.label_length, 2)} for n, s in table], indent=2)
    lines = ["| Dataset | # samples | Accuracy | 1 - NED | Confidence | Label length |",
             "|:--|--:|--:|--:|--:|--:|"]
    for name, s in table:
        bold = "**" if name == "Combined" else ""
        lines.append(f"| {bold}{name}{bold} | {s.n} | {s.accuracy:.2f} | {s.one_minus_ned:.2f} | "
                     f"{s.confidence:.2f} | {s.label_length:.2f} |")
    return "\n".join(lines)
