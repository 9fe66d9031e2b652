"""Checkpoints every N minutes/steps and on SIGTERM/SIGINT, written atomically to `last.ckpt`."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch


class ResumableCheckpoint(L.Callback):
    """Saves `last.ckpt` every `minutes` (and/or `steps`), at the end, and when SIGTERM/SIGINT arrives.

    The file is written beside its final name and renamed, so a kill during the write never corrupts the
    previous checkpoint; a run killed any other way (SIGKILL) loses at most one interval.
    """

    def __init__(self, out_dir: str | Path, minutes: float | None = 10.0, steps: int | None = None) -> None:
        self.path = Path(out_dir) / "last.ckpt"
        self.minutes, self.steps = minutes, steps
        self._last_save = time.monotonic()
        self._saved_step = 0
        self._signal: int | None = None
        self._previous: dict[int, object] = {}
        self._mid_step = False  # inside an optimiser step's batches: weights and optimiser may be half-updated
        self._step_at_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Registered here, after Lightning has installed its own SIGTERM handler, to replace it rather than run
        # after it: Lightning's handler forwards the signal to the other ranks' processes and broadcasts from
        # inside the handler, so with several ranks some died or raised while others waited in the save.
        self._last_save = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. some launchers): rely on periodic saves
                pass

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal = signum

    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt atomically (rank 0 writes; every rank takes part as Lightning requires)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the whole state (optimiser, loops, callbacks)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self._last_save, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if not self._mid_step:
            self._step_at_start = trainer.global_step
        self._mid_step = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches make one step: a state is whole (and is saved) only after
        # the batch whose optimiser step ended it; every rank accumulates alike, so all return here together.
        self._mid_step = step == self._step_at_start
        if self._mid_step:
            return
        due = step > self._saved_step and bool((self.steps and step % self.steps == 0) or (
            self.minutes is not None and time.monotonic() - self._last_save >= 60 * self.minutes))
        stop, due = self._agree(trainer, self._signal is not None, due)
        if stop:
            self._signal = self._signal or signal.SIGTERM  # a signal that reached another rank only
            # Lightning writes a step's logged metrics after this hook: write them now, or the last step's
            # losses would be missing from the run's log (Lightning has no public call for this).
            connector = getattr(trainer, "_logger_connector", None)
            if connector is not None:
                connector.update_train_step_metrics()
            self._save_after_signal(trainer)
            # Leave now: stopping through Lightning would first run a whole end-of-epoch validation.
            os._exit(0)
        elif due:
            self.save(trainer)

    @staticmethod
    def _agree(trainer: L.Trainer, stop: bool, due: bool) -> tuple[bool, bool]:
        """Whether any rank got a signal or is due to save: a save is collective, and ranks that decided
        apart (clocks, a signal delivered to one process) would wait on each other forever."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return stop, due
        flags = torch.tensor([stop, due], dtype=torch.int32, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, due = flags.tolist()
        return bool(stop), bool(due)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save after a signal when an exception stopped the loop between steps (Lightning's own SIGTERM check,
        a failure in validation); never in the middle of a step, whose state would be half-updated."""
        if self._signal is None or trainer.global_step == 0:
            return
        # A save is collective: ranks that fail apart would wait on each other, so several ranks keep the last
        # checkpoint (their signals are handled between steps, where they agree).
        if not self._mid_step and trainer.world_size == 1:
            self._save_after_signal(trainer)
        elif trainer.is_global_zero:
            # e.g. a data worker killed by the same signal (`pkill -f` matches the workers' command line too):
            # PyTorch raises inside the step, so the last whole step on disk is the periodic checkpoint's.
            saved = f"step {self._saved_step}" if self._saved_step else "written by an earlier run"
            kept = (f"{self.path} ({saved}) is the checkpoint to resume from with --resume" if self.path.is_file()
                    else "no checkpoint had been written yet")
            where = f"in the middle of step {trainer.global_step + 1}" if self._mid_step else "on one of several ranks"
            print(f"\nsignal {self._signal}, then {type(exception).__name__} {where}, which is not saved: {kept}",
                  file=sys.stderr, flush=True)

    def _save_after_signal(self, trainer: L.Trainer) -> None:
        self.save(trainer)
        for logger in trainer.loggers:
            logger.finalize("interrupted")
        if trainer.is_global_zero:
            print(f"\nsignal {self._signal}: checkpoint saved at step {trainer.global_step} to {self.path}; resume "
                  "with --resume", file=sys.stderr, flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._signal is None:
            self.save(trainer)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
