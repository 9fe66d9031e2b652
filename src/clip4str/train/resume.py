"""Resuming a run: its last.ckpt read without running code from it, and checked against the config before any
work."""

from __future__ import annotations

from pathlib import Path

import torch

from clip4str.errors import first_line
from clip4str.model import CLIP4STR
from clip4str.train.config import TrainSection
from clip4str.weights import check_fits


def check_resumable(ckpt: dict, model: CLIP4STR, t: TrainSection, path: Path) -> None:
    """Refuse, before any work, to resume a run whose last.ckpt holds another model or another schedule: Lightning
    would stop with a long traceback, or at the old schedule's last step."""
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    check_fits(model, state, f"{path} (resumed with this config's model)")
    if "averaging_state" in ckpt and t.average_from is None:
        raise ValueError(f"{path} holds averaged weights (train.average_from) and the run's own apart; resume it "
                         "with train.average_from set (the run's value)")
    schedulers = ckpt.get("lr_schedulers") or [{}]
    state = schedulers[0] if isinstance(schedulers[0], dict) else {}
    total = state.get("total_steps")  # OneCycleLR's; LambdaLR (a time budget) has lr_lambdas instead
    if "total_steps" not in state and "lr_lambdas" not in state:
        return  # another scheduler: nothing to compare
    if t.max_minutes is None and total is None:
        raise ValueError(f"{path} was trained with a time budget (train.max_minutes); resume it with the same "
                         "train.max_minutes")
    if t.max_minutes is not None and total is not None:
        raise ValueError(f"{path} was trained with a schedule of {total} steps, not a time budget; resume it "
                         "without train.max_minutes")
    if total is not None and total != t.max_steps:
        raise ValueError(f"{path}'s schedule ends at step {total}, not train.max_steps={t.max_steps}: a schedule "
                         f"is fixed when a run starts; resume with train.max_steps={total}, or start a new run "
                         "from its weights (export them with --export-last DIR, then model.init=checkpoint:DIR)")


def read_training_checkpoint(path: Path) -> dict:
    """A run's last.ckpt read without running code from it (tensors and plain containers only)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
            raise ValueError("no state_dict or global_step in it")
        _check_shape(ckpt)
    except Exception as e:  # a truncated, foreign or hostile file: name it instead of a pickle traceback
        reason = first_line(e)
        if reason.startswith("Weights only load failed"):  # not torch's advice to unpickle an untrusted file
            reason = "it holds objects other than tensors and plain containers"
        raise ValueError(f"{path} is not a readable training checkpoint ({type(e).__name__}: {reason}); "
                         "resume from an earlier copy or train again") from e
    return ckpt


# What Lightning reads from a checkpoint it resumes, beside the weights; a foreign file lacking one stops it deep
# inside trainer.fit, after the run has written its config and logs.
LIGHTNING_KEYS = ("pytorch-lightning_version", "epoch", "loops", "optimizer_states", "lr_schedulers")


def _check_shape(ckpt: dict) -> None:
    """The types a Lightning checkpoint of ours has, so that a foreign one is named, not a TypeError later."""
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise ValueError("its state_dict maps names to something other than tensors")
    if type(ckpt["global_step"]) is not int or ckpt["global_step"] < 0:
        raise ValueError(f"its global_step is {ckpt['global_step']!r}, not a step count")
    missing = [k for k in LIGHTNING_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}: not a checkpoint Lightning saved")
    if not isinstance(ckpt["lr_schedulers"], list) or not isinstance(ckpt["optimizer_states"], list):
        raise ValueError("its lr_schedulers or optimizer_states are not lists")
