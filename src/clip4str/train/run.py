"""`clip4str train`: build model, data and Lightning trainer from a config; resume; export; plot."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from clip4str.data.datamodule import Source, STRDataModule
from clip4str.destinations import check_checkpoint_destination
from clip4str.model import CLIP4STR
from clip4str.train.averaging import TailAveraging
from clip4str.train.budget import TimeBudget
from clip4str.train.callbacks import ResumableCheckpoint
from clip4str.train.checks import check_sources
from clip4str.train.config import TrainConfig
from clip4str.train.history import plot_history
from clip4str.train.outdir import claimed
from clip4str.train.resume import check_resumable, read_training_checkpoint
from clip4str.train.start import build_model
from clip4str.train.system import STRSystem
from clip4str.weights import load_exact, save_checkpoint

STARTED_FROM = "started_from.json"


def run_provenance(cfg: TrainConfig, step: int, images_per_step: int, **extra: object) -> dict:
    """What an exported model records of its training: this run's steps, images and config, and (when it
    started from a clip4str checkpoint) that checkpoint's own provenance, so a chain of runs stays traceable."""
    doc = {"steps": step, "images_seen": step * images_per_step, **extra, "config": cfg.to_dict()}
    started = Path(cfg.train.out_dir) / STARTED_FROM
    if started.is_file():
        doc["started_from"] = json.loads(started.read_text(encoding="utf-8"))
    return doc


def parameter_report(model: CLIP4STR) -> str:
    """'trainable / total' parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"parameters: {trainable / 1e6:.2f}M trainable / {total / 1e6:.2f}M total"


class _ResumeAwareData(STRDataModule):
    """Starts the training stream where the restored step left off (any number of ranks and workers)."""

    def train_dataloader(self):  # noqa: D102
        trainer = self.trainer
        if trainer is not None:  # outside a fit (e.g. timing the loader) the stream starts at batch 0
            self.start_batch = trainer.global_step * trainer.accumulate_grad_batches
            self.rank, self.world = trainer.global_rank, trainer.world_size
        return super().train_dataloader()


def build_datamodule(cfg: TrainConfig, model: CLIP4STR) -> STRDataModule:
    """The experiment's training and validation data for this model (sources opened, so bad paths fail here)."""
    d, mc = cfg.data, model.config
    dm = _ResumeAwareData([Source(**s) for s in d.train], d.val, mc.charset, mc.image_size, mc.image_mean,
                          mc.image_std, d.batch_size, d.num_workers, mc.max_label_length, cfg.train.seed, d.fonts,
                          d.backgrounds, d.synth_val_size, d.augment, d.curriculum_images,
                          scale_jitter=d.scale_jitter, join_real=d.join_real)
    dm.setup()
    check_synth_resources(dm, d.min_fonts, d.min_photos)
    return dm


def check_synth_resources(dm: STRDataModule, min_fonts: int, min_photos: int) -> None:
    """Refuse a recipe whose synthetic words would be drawn with fewer fonts or photos than it asks for (a fresh
    machine without the font and wallpaper packages otherwise trains hours on other images, silently)."""
    for renderer in dm.renderers:
        fonts, photos = len(renderer.fonts), len(renderer.backgrounds.photos)
        if fonts < min_fonts or photos < min_photos:
            raise ValueError(f"synthetic words would use {fonts} fonts and {photos} background photos; this recipe "
                             f"asks for at least {min_fonts} and {min_photos} (data.min_fonts, data.min_photos): "
                             "install the packages of README 'Fonts and photos', or pass data.fonts=[DIR] "
                             "data.backgrounds=[DIR]")


def check_paths(cfg: TrainConfig, init: bool = True) -> None:
    """Fail before any work if a data path, font folder or init file is missing (init=False: a checkpoint
    folder to start from is not needed)."""
    check_sources(cfg.data.train)  # again: a TrainConfig built in code skipped load_config's checks
    paths = [i["path"] for i in cfg.data.train if i["path"] != "synth"] + list(cfg.data.val)
    paths += list(cfg.data.fonts or []) + list(cfg.data.backgrounds or [])
    if ":" in cfg.model.init and (init or not cfg.model.init.startswith("checkpoint:")):
        paths.append(cfg.model.init.partition(":")[2])
    for p in paths:
        if not Path(p).exists():
            where = "" if Path(p).is_absolute() else \
                f" (relative paths are read from the current folder: {str(Path.cwd() / p)!r})"
            raise FileNotFoundError(f"{p!r} (named in the config) does not exist{where}")


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Drop two lines of Lightning's start-up that say nothing about the run: an advert for its cloud logger and a
    deprecation warning its own code triggers in PyTorch."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvert) for f in logger.filters):
        logger.addFilter(_NoAdvert())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def train(cfg: TrainConfig, resume: bool = False) -> Path | None:
    """Run (or resume) an experiment; returns the exported model folder (None on ranks other than 0)."""
    check_paths(cfg, init=not resume)  # a resumed run's weights come from last.ckpt
    out = Path(cfg.train.out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"train.out_dir {str(out)!r} is a file; give a folder for the run")
    with claimed(out, resume):
        return _train(cfg, resume)


def _train(cfg: TrainConfig, resume: bool) -> Path | None:
    quiet_lightning()
    t, d = cfg.train, cfg.data
    out = Path(t.out_dir)
    last = out / "last.ckpt"
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {last}; start without --resume")
        ckpt = read_training_checkpoint(last)  # a truncated or foreign file stops here, before any work
    elif last.is_file():
        raise FileExistsError(f"{out} already holds a run (last.ckpt); pass --resume to continue it or choose "
                              "another train.out_dir")
    if t.threads:
        torch.set_num_threads(t.threads)
    L.seed_everything(t.seed, workers=True, verbose=False)
    model = build_model(cfg, init=not resume)
    if resume:
        check_resumable(ckpt, model, t, last)
        del ckpt  # Lightning reads the file itself
    dm = build_datamodule(cfg, model)
    out.mkdir(parents=True, exist_ok=True)
    run_id = len(list(out.glob("logs/run-*")))
    # In this order after each step: the budget's progress, which the average reads; the average; then a
    # checkpoint, which must hold the step's average (a signal's save ends the process in that hook).
    callbacks: list[L.Callback] = []
    budget = TimeBudget(t.max_minutes, t.max_steps) if t.max_minutes is not None else None
    if budget is not None:
        callbacks.append(budget)
    if t.average_from is not None:
        callbacks.append(TailAveraging(t.average_from, t.max_steps))
    callbacks.append(ResumableCheckpoint(out, t.checkpoint_every_minutes, t.checkpoint_every_steps))
    trainer = L.Trainer(
        max_steps=t.max_steps, precision=t.precision, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy,  # gradients are clipped by STRSystem (fused AdamW)
        accumulate_grad_batches=t.accumulate_grad_batches, val_check_interval=t.val_every_steps,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=t.log_every_steps,
        enable_checkpointing=False, enable_progress_bar=sys.stderr.isatty(),  # no bar spam in nohup logs
        enable_model_summary=False,  # parameter_report below says it in one line
        # The training stream splits itself by rank; every rank validates the whole of each set, so the
        # numbers rank 0 logs are those of the full sets without gathering scores.
        use_distributed_sampler=False,
        callbacks=callbacks, default_root_dir=str(out),
        logger=[CSVLogger(out / "logs", name="", version=f"run-{run_id}"),
                TensorBoardLogger(out / "logs", name="", version=f"run-{run_id}")],
        limit_val_batches=1.0 if dm.val_names else 0)
    if trainer.is_global_zero:  # other ranks write nothing: one copy of every file, one report
        print(parameter_report(model), file=sys.stderr)
        if dm.describe():
            print(dm.describe(), file=sys.stderr)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if not resume and cfg.model.init.partition(":")[0] in ("checkpoint", "builtin"):
            # Written at the start: the init checkpoint (the built-in model above all) may be replaced before
            # export.
            (out / STARTED_FROM).write_text(json.dumps({"init": cfg.model.init, "provenance": model.provenance},
                                                       indent=1), encoding="utf-8")
    effective = d.batch_size * trainer.world_size * t.accumulate_grad_batches  # the lr follows it
    system = STRSystem(model, t, effective, dm.val_names, batch_size=d.batch_size)
    start = time.time()
    # weights_only: a checkpoint (copied from elsewhere, perhaps) is untrusted; ours hold only tensors and
    # plain containers, so nothing in them needs pickle's power to run code.
    trainer.fit(system, datamodule=dm, ckpt_path=str(last) if resume else None, weights_only=True)
    if not trainer.is_global_zero:
        return None
    spent = budget is not None and budget.elapsed() >= budget.seconds
    if trainer.global_step < t.max_steps and not spent:  # stopped by a signal: the checkpoint is the result
        return last
    extra = {"budget_minutes": t.max_minutes} if budget is not None else {}
    provenance = run_provenance(cfg, trainer.global_step, effective,
                                wall_seconds_last_run=round(time.time() - start), **extra)
    final = save_checkpoint(model, out / "final", provenance, force=True)  # the run's own output
    plot_history(out)
    return final


def export_last(cfg: TrainConfig, dest: str | Path, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Write the model of the run's last.ckpt as a checkpoint folder (e.g. a run stopped before max_steps); a
    folder holding a checkpoint already is replaced only with `force`."""
    check_checkpoint_destination(Path(dest), force)
    last = Path(cfg.train.out_dir) / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"no checkpoint at {last}: train first (train.out_dir of this config)")
    ckpt = read_training_checkpoint(last)
    states, step = ckpt["state_dict"], int(ckpt["global_step"])
    model = build_model(cfg, init=False)
    state = {k.removeprefix("model."): v for k, v in states.items() if k.startswith("model.")}
    load_exact(model, state, str(last))
    effective = ckpt.get("effective_batch", cfg.data.batch_size * cfg.train.accumulate_grad_batches)
    provenance = run_provenance(cfg, step, effective, max_steps=cfg.train.max_steps)
    return save_checkpoint(model.eval(), dest, provenance, dtype=dtype, force=force)
