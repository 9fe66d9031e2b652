"""A folder of labelled crops: `labels.tsv` with `path<TAB>label[<TAB>...]` lines, paths relative to it."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from clip4str.charset import LabelNormalizer
from clip4str.data.compat import Dataset
from clip4str.data.transforms import ImageDecodeError, load_image

LABELS_NAME = "labels.tsv"


def read_label_file(path: str | Path) -> list[tuple[Path, str]]:
    """(absolute image path, raw label) pairs of a `path<TAB>label` file; a `path<TAB>label` header is skipped.

    Relative paths are taken relative to the file's folder. Malformed lines are an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {str(path)!r} does not exist; a folder dataset needs {LABELS_NAME}")
    rows = []
    # Lines end at \n (\r\n too) only: str.splitlines() would also cut at U+2028, \x85, \x0c or \x1c inside a label.
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{path}:{number}: expected 'path<TAB>label', got {line[:80]!r}")
        if number == 1 and fields[0].strip().lower() == "path" and fields[1].strip().lower() == "label":
            continue
        rows.append((path.parent / fields[0], fields[1]))
    return rows


class FolderDataset(Dataset):
    """Labelled crops listed in `labels.tsv`; every listed file must exist (checked up front)."""

    def __init__(self, root: str | Path, normalizer: LabelNormalizer | None = None,
                 transform: Callable[[Image.Image], Any] | None = None, report: bool = True) -> None:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
        label_file = root / LABELS_NAME if root.is_dir() else root
        self.root = label_file.parent
        self.transform = transform
        rows = read_label_file(label_file)
        missing = [os.path.relpath(p, self.root) for p, _ in rows if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            slash = "; write paths with '/'" if "\\" in missing[0] else ""
            raise FileNotFoundError(f"{label_file} lists {missing[0]!r}{more}, which does not exist under "
                                    f"{str(self.root)!r}{slash}")
        self.raw_count = len(rows)
        self.paths: list[Path] = []
        self.labels: list[str] = []
        for image_path, label in rows:
            if normalizer is not None:
                label = normalizer(label)
                if label is None:
                    continue
            self.paths.append(image_path)
            self.labels.append(label)
        if report and normalizer is not None:
            print(f"{label_file}: {self.raw_count} samples; labels: {normalizer.stats.summary()}", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.paths)

    def group(self, index: int) -> str:
        """Sub-folder of sample `index` relative to the root (used to report benchmarks separately)."""
        return os.path.relpath(self.paths[index].parent, self.root)

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        try:
            image = load_image(self.paths[index])
        except ImageDecodeError as e:
            warnings.warn(f"{e}; not loaded", stacklevel=2)
            return None
        return (self.transform(image) if self.transform else image), self.labels[index]
