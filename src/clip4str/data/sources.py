"""Open labelled data by path: an LMDB root or a folder with labels.tsv (no PyTorch needed)."""

from __future__ import annotations

from pathlib import Path

from clip4str.charset import LabelNormalizer
from clip4str.data.compat import ConcatDataset, Dataset
from clip4str.data.folder import FolderDataset
from clip4str.data.lmdb import lmdb_dataset


def open_labelled(path: str | Path, normalizer: LabelNormalizer | None) -> Dataset:
    """An LMDB root (any folder holding data.mdb files) or a folder with labels.tsv."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if (p / "labels.tsv").is_file() or p.name == "labels.tsv":
        return FolderDataset(p, normalizer)
    return lmdb_dataset(p, normalizer)


def dataset_labels(data: Dataset) -> list[str]:
    """Labels of a folder/LMDB dataset (or a concatenation of them), without decoding any image."""
    if isinstance(data, ConcatDataset):
        return [label for part in data.datasets for label in dataset_labels(part)]
    return list(data.labels)
