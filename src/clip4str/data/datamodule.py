"""Training data: weighted mixing of synthetic and real sources as a deterministic, resumable stream."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip4str.charset import LabelNormalizer
from clip4str.data.augment import RandAugment, check_augment, join_horizontally, rescale_vertically
from clip4str.data.compat import Dataset, Subset
from clip4str.data.sources import open_labelled
from clip4str.data.synth import WordRenderer
from clip4str.data.transforms import preprocess

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)

# `data.scale_jitter`: how far a sample's text may be rescaled vertically (share of the crop's height repeated
# above and below, or cut), since real crops come cut loosely or tightly around their words.
MAX_PAD, MAX_CUT = 0.25, 0.10
# `data.join_real`: two real crops joined side by side make one longer word only up to this width:height, within
# what reading takes whole (the built-in model: up to 11.25:1; wider crops are read in windows).
MAX_JOINED_ASPECT = 9.0


@dataclass
class Source:
    """One training source: `synth`, or a path to LMDB root / labels.tsv folder; weight = share of samples.

    `holdout` sets aside that fraction of a real source (a fixed, seeded choice) for validation.
    """

    path: str
    weight: float = 1.0
    holdout: float = 0.0
    # This source's RandAugment ({num_ops, magnitude, prob}, the rest as the reference's 3 / 5 / 0.5): a model
    # that has learnt a few thousand real crops by heart reads their plain views right and learns nothing more.
    augment: dict[str, float] | None = None

    def __post_init__(self) -> None:
        check_augment(f"data source {self.path}", self.augment)

    def randaugment(self) -> RandAugment:
        """This source's augmentation."""
        options = dict(self.augment or {})
        if "num_ops" in options:
            options["num_ops"] = int(options["num_ops"])
        return RandAugment(**options)

    @property
    def is_synth(self) -> bool:
        """True for the on-the-fly synthetic generator."""
        return self.path == "synth"


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a fixed random `fraction` of range(n) held out."""
    if not fraction:
        return list(range(n)), []
    order = np.random.default_rng(seed).permutation(n)
    # At least one sample of a small source: a holdout asked for is never silently empty.
    cut = max(int(round(n * fraction)), 1 if n > 1 else 0)
    return sorted(order[cut:].tolist()), sorted(order[:cut].tolist())


def split_source(source: Source, charset: str, max_label_length: int) -> tuple[Dataset, Subset | None]:
    """A real source opened with the training labels' rules: (training part, held-out part or None)."""
    if not 0 <= source.holdout < 1:
        raise ValueError(f"data source {source.path}: holdout must be in [0, 1), got {source.holdout}")
    data = open_labelled(source.path, LabelNormalizer(charset, max_label_length))
    # The split ignores the training seed: runs that continue one another never validate on crops an earlier
    # run trained on.
    train_idx, held = holdout_split(len(data), source.holdout)
    if not train_idx:
        raise ValueError(f"data source {source.path} has no training samples left (after label filtering for "
                         "the charset and the holdout); check its labels and the model's charset")
    if not held:
        return data, None
    return Subset(data, train_idx), Subset(data, held)


def holdout_name(source: Source) -> str:
    """The validation name of a source's held-out part (as logged: val/<name>/accuracy)."""
    return f"{Path(source.path).name}-holdout"


def init_worker(worker_id: int) -> None:
    """Set up a DataLoader worker so that it never outlives its run.

    It leaves the process group, so that a signal sent to the whole group (Ctrl-C, `timeout`, a scheduler)
    reaches only the main process, which checkpoints and stops the workers. Ignoring SIGTERM instead would make
    workers unkillable by the parent too: a script that raises while workers are alive then hangs at exit.

    On Linux it also asks the kernel to kill it when the main process dies by any means (os._exit, SIGKILL, a
    crash): PyTorch's own check of the parent runs only every few seconds, and a worker that is blocked writing a
    result nobody reads never gets there, keeping the run's output pipe open (a `$(...)` in a shell then
    waits forever).
    """
    os.setpgrp()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the main process died before the request took effect
            os._exit(1)


def collate(batch: Sequence[tuple[torch.Tensor, str] | None]) -> tuple[torch.Tensor, list[str]]:
    """Stack images, list labels; samples that failed to load (None) are dropped."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), []
    return torch.stack([img for img, _ in kept]), [label for _, label in kept]


class TrainStream(IterableDataset):
    """Endless (image tensor, label) stream. Sample g depends only on (seed, g): which source, which item,
    which augmentation. Worker w builds batches w, w + W, ... so batches arrive in order for any worker count,
    and a resumed run continues at `start_batch` with exactly the samples an uninterrupted run would see.
    With `curriculum_images` > 0, sample g gets difficulty min(1, g / curriculum_images): synthetic words start
    clean and gain distortions, and augmentation is applied with that probability. With `join_real` a share of
    the real samples are a crop joined with another crop of its source (`joined`).
    """

    def __init__(self, sources: list[tuple[Source, Any]], batch_size: int, image_size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], seed: int = 0, augment: bool = True,
                 start_batch: int = 0, rank: int = 0, world: int = 1, curriculum_images: int = 0,
                 scale_jitter: float = 0.0, join_real: float = 0.0, max_label_length: int = 25) -> None:
        self.sources = sources
        weights = np.array([s.weight for s, _ in sources], dtype=np.float64)
        if (weights <= 0).any() or not len(weights):
            raise ValueError("every data source needs a positive weight")
        self.cumulative = np.cumsum(weights / weights.sum())
        self.batch_size, self.image_size, self.mean, self.std = batch_size, image_size, mean, std
        self.seed, self.start_batch, self.rank, self.world = seed, start_batch, rank, world
        self.augments = [s.randaugment() for s, _ in sources] if augment else None
        self.curriculum_images, self.scale_jitter = curriculum_images, scale_jitter
        self.join_real, self.max_label_length = join_real, max_label_length

    def sample(self, g: int) -> tuple[torch.Tensor, str] | None:
        """Global sample number g of the stream."""
        rng = np.random.default_rng([self.seed, g])
        difficulty = min(1.0, g / self.curriculum_images) if self.curriculum_images > 0 else 1.0
        k = min(int(np.searchsorted(self.cumulative, rng.random(), side="right")), len(self.sources) - 1)
        source, data = self.sources[k]
        try:
            if source.is_synth:
                image, label = data.render(int(rng.integers(2**62)), difficulty)
            else:
                item = data[int(rng.integers(len(data)))]
                if item is None:
                    return None
                image, label = item
                # Drawn only when on, as scale jitter below.
                if self.join_real and rng.random() < self.join_real:
                    image, label = self.joined(image, label, data, rng)
            # Drawn only when on, so that streams without it stay what they were (exact resume of older runs).
            if self.scale_jitter and rng.random() < self.scale_jitter:
                image = rescale_vertically(image, rng.uniform(-MAX_CUT, MAX_PAD))
            if self.augments is not None and (difficulty >= 1.0 or rng.random() < difficulty):
                image = self.augments[k](image, random.Random(int(rng.integers(2**62))))
            return self._tensor(image), label
        except MemoryError:  # the machine, not the sample: skipping would fill the log while memory stays full
            raise
        except Exception as e:  # one odd font, word or crop must not stop a run of hours: drop that sample
            warnings.warn(f"training sample {g} ({source.path}) failed and was skipped: {type(e).__name__}: {e}",
                          stacklevel=1)
            return None

    def joined(self, image: Image.Image, label: str, data: Any, rng: np.random.Generator
               ) -> tuple[Image.Image, str]:
        """The crop with another crop of the same real source joined on its right, labels concatenated: real
        textures for long words and strings no dictionary holds. The crop is kept alone when the joined label
        would be too long, the joined crop too wide or the other crop unreadable."""
        other = data[int(rng.integers(len(data)))]
        if other is None or len(label) + len(other[1]) > self.max_label_length:
            return image, label
        right = other[0]
        if image.width / image.height + right.width / right.height > MAX_JOINED_ASPECT:
            return image, label
        return join_horizontally(image, right), label + other[1]

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.image_size, self.mean, self.std)[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str] | None]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        local = self.start_batch + worker  # this rank's batch number
        while True:
            batch = local * self.world + self.rank  # ranks take interleaved batches of one global stream
            for g in range(batch * self.batch_size, (batch + 1) * self.batch_size):
                yield self.sample(g)
            local += workers


class EvalSet(Dataset):
    """A labelled dataset (or subset) turned into preprocessed tensors for validation."""

    def __init__(self, data: Dataset, image_size: tuple[int, int], mean: Sequence[float], std: Sequence[float]):
        self.data, self.image_size, self.mean, self.std = data, image_size, mean, std

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | None:
        item = self.data[index]
        if item is None:
            return None
        return preprocess(item[0], self.image_size, self.mean, self.std)[0], item[1]


class STRDataModule(L.LightningDataModule):
    """Weighted training mix (synthetic stream + real LMDB/folders) and validation sets, with workers."""

    def __init__(self, sources: list[Source], val_paths: list[str], charset: str, image_size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], batch_size: int = 64, num_workers: int = 0,
                 max_label_length: int = 25, seed: int = 0, synth_fonts: list[str] | None = None,
                 synth_backgrounds: list[str] | None = None, synth_val_size: int = 0, augment: bool = True,
                 curriculum_images: int = 0, scale_jitter: float = 0.0, join_real: float = 0.0) -> None:
        super().__init__()
        self.sources, self.val_paths = sources, val_paths
        self.charset, self.image_size, self.mean, self.std = charset, tuple(image_size), mean, std
        self.batch_size, self.num_workers, self.max_label_length, self.seed = batch_size, num_workers, \
            max_label_length, seed
        self.synth_fonts, self.synth_backgrounds, self.synth_val_size = synth_fonts, synth_backgrounds, synth_val_size
        self.augment, self.curriculum_images, self.scale_jitter = augment, curriculum_images, scale_jitter
        self.join_real = join_real
        self.start_batch, self.rank, self.world = 0, 0, 1
        self._train: list[tuple[Source, Any]] | None = None
        self._val: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Open every source (fails early, naming a missing or damaged path)."""
        if self._train is not None:
            return
        self._train = []
        for s in self.sources:
            if s.is_synth:
                renderer = WordRenderer(self.charset, self.synth_fonts, self.synth_backgrounds, seed=self.seed,
                                        max_length=self.max_label_length)
                self._train.append((s, renderer))
                if self.synth_val_size:  # a disjoint seed: never the same images as the training stream
                    val = WordRenderer(self.charset, self.synth_fonts, self.synth_backgrounds,
                                       seed=self.seed + 10_000_019, max_length=self.max_label_length)
                    self._val["synth"] = _Rendered(val, self.synth_val_size)
                continue
            train, held = split_source(s, self.charset, self.max_label_length)
            self._train.append((s, train))
            if held is not None:
                self._val[holdout_name(s)] = held
        for path in self.val_paths:
            self._val[Path(path).name] = open_labelled(path, LabelNormalizer(self.charset, self.max_label_length))

    def train_dataloader(self) -> DataLoader:
        """Batches of the training stream, starting at `start_batch` (set when resuming)."""
        stream = TrainStream(self._train, self.batch_size, self.image_size, self.mean, self.std, self.seed,
                             self.augment, self.start_batch, self.rank, self.world, self.curriculum_images,
                             self.scale_jitter, self.join_real, self.max_label_length)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
                          worker_init_fn=init_worker)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per validation set, in `val_names` order."""
        return [DataLoader(EvalSet(d, self.image_size, self.mean, self.std), batch_size=self.batch_size,
                           num_workers=self.num_workers, collate_fn=collate, worker_init_fn=init_worker)
                for d in self._val.values()]

    @property
    def renderers(self) -> list[WordRenderer]:
        """The synthetic word renderers of the training mix (after setup)."""
        return [data for s, data in self._train or [] if s.is_synth]

    def describe(self) -> str:
        """One line on what the synthetic words are drawn with (a machine without the font and wallpaper
        packages trains on other images than the recipe's, silently otherwise)."""
        return "; ".join(f"synthetic words: {len(r.fonts)} fonts, {len(r.backgrounds.photos)} background photos"
                         for r in self.renderers)

    @property
    def val_names(self) -> list[str]:
        """Names of the validation sets."""
        return list(self._val)


class _Rendered(Dataset):
    """The first n samples of a renderer as a fixed dataset."""

    def __init__(self, renderer: WordRenderer, n: int) -> None:
        self.renderer, self.n = renderer, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return self.renderer[index]
