"""Training for a wall-clock budget: the learning-rate schedule follows the elapsed share of the budget (or of
max_steps, whichever is further), so a run of N minutes warms up and anneals to zero at its end whatever its
step rate turns out to be."""

from __future__ import annotations

import math
import time

import lightning as L
import torch

_clock = time.monotonic  # the budget's clock (tests replace it to make the schedule independent of machine load)

# OneCycleLR's defaults, so a budgeted run has the same schedule shape as a run of fixed length.
DIV_FACTOR, FINAL_DIV_FACTOR = 25.0, 1e4


def one_cycle(progress: float, warmup: float) -> float:
    """OneCycle's learning-rate multiplier (of the peak) at `progress` in [0, 1]: cosine warm-up from
    1/DIV_FACTOR over the first `warmup` share, then cosine annealing to 1/(DIV_FACTOR x FINAL_DIV_FACTOR)."""
    start, end = 1 / DIV_FACTOR, 1 / (DIV_FACTOR * FINAL_DIV_FACTOR)
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        low, high, t = start, 1.0, p / warmup
    else:
        low, high, t = 1.0, end, (p - warmup) / max(1.0 - warmup, 1e-12)
    return high + (low - high) * (1 + math.cos(math.pi * t)) / 2


class TimeBudget(L.Callback):
    """Sets `progress` (the share of the budget spent) on the LightningModule after every step, which the
    learning-rate schedule reads, and stops the run when it reaches 1. Elapsed time is kept in checkpoints, so
    a resumed run goes on with the same budget. With several ranks, every rank uses the largest progress of any
    rank: the same learning rate and the same last step everywhere."""

    def __init__(self, minutes: float, max_steps: int) -> None:
        if minutes <= 0:
            raise ValueError(f"train.max_minutes must be positive, got {minutes}")
        self.seconds, self.max_steps = 60.0 * minutes, max_steps
        self.elapsed_before = 0.0
        self._start: float | None = None

    def elapsed(self) -> float:
        """Seconds of this budget spent, earlier runs of a resumed experiment included."""
        return self.elapsed_before + (_clock() - self._start if self._start is not None else 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = _clock()

    def _progress(self, trainer: L.Trainer) -> float:
        progress = max(self.elapsed() / self.seconds, trainer.global_step / self.max_steps)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            value = torch.tensor([progress], dtype=torch.float64, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            progress = float(value.item())
        return progress

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        pl_module.progress = progress = self._progress(trainer)
        if progress >= 1.0:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.elapsed_before = float(state_dict["elapsed"])
