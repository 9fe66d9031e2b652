"""Map-style dataset classes without PyTorch: reading and scoring with ONNX Runtime import no torch, even where
it is installed (importing it takes about a second). torch's DataLoader takes any object with __len__ and
__getitem__, so training uses these too."""

from __future__ import annotations

import bisect
import itertools


class Dataset:
    """A map-style dataset: __len__ and __getitem__ (as torch.utils.data.Dataset)."""


class ConcatDataset(Dataset):
    """Datasets one after another (as torch.utils.data.ConcatDataset)."""

    def __init__(self, datasets):  # noqa: ANN001
        self.datasets = list(datasets)
        self.cumulative_sizes = list(itertools.accumulate(len(d) for d in self.datasets))

    def __len__(self) -> int:
        return self.cumulative_sizes[-1] if self.cumulative_sizes else 0

    def __getitem__(self, index: int):  # noqa: ANN204
        k = bisect.bisect_right(self.cumulative_sizes, index)
        return self.datasets[k][index - (self.cumulative_sizes[k - 1] if k else 0)]


class Subset(Dataset):
    """The items of a dataset at `indices` (as torch.utils.data.Subset)."""

    def __init__(self, dataset, indices):  # noqa: ANN001
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):  # noqa: ANN204
        return self.dataset[self.indices[index]]


__all__ = ["ConcatDataset", "Dataset", "Subset"]
