"""Weight averaging of a run's last stretch (SWA along the annealing tail), step-based so that it works with the
streamed training data (one endless epoch) and with a time budget."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging


class TailAveraging(WeightAveraging):
    """Equal-weight average of the weights after every optimiser step from `start` (a share of the schedule: of
    the time budget or of max_steps, whichever is further) on. Once the average has begun, validation,
    checkpoints (`state_dict`) and the final export hold the average; before, the current weights, so a run stopped
    early never falls back to its starting weights (Lightning's callback alone swaps in its untouched copy)."""

    def __init__(self, start: float, max_steps: int) -> None:
        # Parameters only: the model has no running statistics, and its buffers are constants.
        super().__init__(use_buffers=False)
        self.start, self.max_steps = start, max_steps
        self._module: L.LightningModule | None = None
        self._swapped = False  # the live module holds the average (during validation)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._module = pl_module

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or self._module is None:
            return False
        # `progress` is the time budget's share spent (TimeBudget runs before this callback); 0 without a budget.
        return max(getattr(self._module, "progress", 0.0), (step_idx + 1) / self.max_steps) >= self.start

    def begun(self) -> bool:
        """Whether at least one step's weights are in the average."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.begun():
            super().on_validation_epoch_start(trainer, pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.begun():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.begun():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            if self._swapped:  # saved inside validation (a signal, then an error there): the roles are crossed
                checkpoint["state_dict"], checkpoint["current_model_state"] = \
                    checkpoint["current_model_state"], checkpoint["state_dict"]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "averaging_state" in checkpoint:  # otherwise the average had not begun: the copy made at setup stands
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
