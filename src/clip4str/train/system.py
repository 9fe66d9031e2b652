"""The LightningModule: permutation loss, AdamW groups of the reference, OneCycle schedule, validation."""

from __future__ import annotations

import sys
import time

import lightning as L
import torch

from clip4str.charset import CHARSETS
from clip4str.metrics import Scores
from clip4str.model import CLIP4STR
from clip4str.model.peft import PEFT_PREFIXES
from clip4str.model.towers import encode_image_tokens
from clip4str.train.budget import one_cycle
from clip4str.train.compile import attention_kernel, compile_image_encoder
from clip4str.train.config import TrainSection

# New modules (decoders, PEFT) learn at decoder_lr_scale x the pre-trained towers' rate.
FAST_PREFIXES = ("image_decoder.", "cross_decoder.", *PEFT_PREFIXES)
NO_DECAY_NAMES = ("pos_queries", "text_embed", "positional_embedding", "class_embedding")
EMPTY_BATCHES_LIMIT = 20  # batches in a row with no loadable sample: the data, not a few damaged files


class UnreadableTrainingData(ValueError):
    """Batch after batch, no training sample could be loaded."""


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite."""


def parameter_groups(model: CLIP4STR, lr: float, decoder_lr_scale: float, weight_decay: float) -> list[dict]:
    """AdamW groups: decoders and PEFT modules at `decoder_lr_scale` x lr; no decay on biases, norms,
    1-D parameters, position queries and embeddings."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        fast = name.startswith(FAST_PREFIXES)
        decay = p.ndim > 1 and not any(n in name for n in NO_DECAY_NAMES)
        groups.setdefault((fast, decay), []).append(p)
    return [{"params": params, "lr": lr * (decoder_lr_scale if fast else 1.0),
             "weight_decay": weight_decay if decay else 0.0} for (fast, decay), params in sorted(groups.items())]


def build_optimizer(model: CLIP4STR, lr: float, decoder_lr_scale: float, weight_decay: float,
                    fused: bool = True) -> torch.optim.AdamW:
    """The reference's AdamW (0.9, 0.98, eps 1e-6) over `parameter_groups`. fused: one kernel for all parameters
    instead of a dozen per parameter (a fifth of a tiny step's host time at batch 2 on CPU went to the
    per-parameter loop: benchmarks/train_step.py --adamw loop)."""
    groups = parameter_groups(model, lr, decoder_lr_scale, weight_decay)
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6, fused=fused)


class STRSystem(L.LightningModule):
    """Trains a CLIP4STR module; validation reports accuracy, 1-NED and confidence per validation set."""

    def __init__(self, model: CLIP4STR, cfg: TrainSection, effective_batch: int, val_names: list[str],
                 batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size  # per device: the shape train.compile_encoder compiles for
        self.model, self.cfg = model, cfg
        self.effective_batch = effective_batch
        self.lr = cfg.base_lr * effective_batch / 512  # the authors' scaling rule
        self.val_names = val_names
        self._scores: list[Scores] = []
        self._last_step_time: float | None = None
        self._empty_batches = 0
        self.progress = 0.0  # share of a time budget spent (train.max_minutes), set by TimeBudget

    def on_train_start(self) -> None:
        if not self.cfg.compile_encoder or not self.batch_size:
            return
        if self.model.image_peft is not None:
            print("train.compile_encoder: not used with model.peft (the tower runs inside the PEFT module); "
                  "training in eager mode", file=sys.stderr)
        elif compile_image_encoder(self.model, self.batch_size, self.trainer.precision_plugin.forward_context()):
            print("train.compile_encoder: the image tower's training steps run compiled", file=sys.stderr)

    def on_train_end(self) -> None:
        self.model.train_image_tokens = encode_image_tokens  # a compiled closure would keep the module unpicklable

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the effective batch beside Lightning's state."""
        checkpoint["effective_batch"] = self.effective_batch  # images per step, for the exported provenance

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        # Every random draw of a step (permutations, dropout) depends on (seed, step): a resumed run repeats
        # exactly what an uninterrupted one does, without saving generator states.
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.global_step)

    def training_step(self, batch: tuple[torch.Tensor, list[str]], batch_idx: int) -> torch.Tensor | None:
        images, labels = batch
        if not labels:  # every sample of the batch failed to load (each was warned about)
            self._empty_batches += 1
            if self._empty_batches >= EMPTY_BATCHES_LIMIT:
                raise UnreadableTrainingData(
                    f"no sample of the last {self._empty_batches} batches could be loaded (see the warnings above): "
                    "the training data is unreadable; check the sources of data.train")
            return None
        self._empty_batches = 0
        with attention_kernel(images.device):
            out = self.model(images, labels)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("img_s", len(labels) / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now
        terms = {"loss": out.loss, "image_loss": out.image_loss, "cross_loss": out.cross_loss,
                 "ctc_loss": out.ctc_loss}
        terms = {k: v.detach() for k, v in terms.items() if v is not None}
        if self.trainer.world_size > 1:  # the whole global batch's losses, in one collective for all terms
            mean = self.trainer.strategy.reduce(torch.stack(list(terms.values())), reduce_op="mean")
            terms = dict(zip(terms, mean.unbind(), strict=True))
        if (self.global_step + 1) % self.cfg.log_every_steps == 0 and not torch.isfinite(terms["loss"]):
            # Checked where the logger reads the loss anyway (a host sync on every step would slow a GPU); the same
            # value on every rank, so all stop together. The last periodic checkpoint stays as it was.
            raise NonFiniteLoss(f"the training loss is {terms['loss'].item()} at step {self.global_step + 1}: the "
                                "run is stopped (its last.ckpt is the last checkpoint saved before); lower "
                                "train.base_lr, or train.precision=32-true, or check the data")
        for name, value in terms.items():
            self.log(name, value, prog_bar=name == "loss")
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Clipped here rather than by Lightning (Trainer.gradient_clip_val), which refuses to clip for a fused
        # optimizer under any mixed precision; with bf16 nothing is scaled, and for fp16 (not fused) Lightning
        # has unscaled the gradients before this hook.
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.cfg.grad_clip)

    def configure_optimizers(self) -> dict:
        # fp16's gradient scaler must unscale before clipping, which a fused AdamW (unscaling inside) does not allow.
        opt = build_optimizer(self.model, self.lr, self.cfg.decoder_lr_scale, self.cfg.weight_decay,
                              fused=not self.cfg.precision.startswith("16"))
        if self.cfg.max_minutes is not None:  # the same shape over the share of the budget spent (TimeBudget)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: one_cycle(self.progress, self.cfg.warmup_pct))
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=self.cfg.max_steps,
                pct_start=self.cfg.warmup_pct, anneal_strategy="cos", cycle_momentum=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_validation_epoch_start(self) -> None:
        self._scores = [Scores(CHARSETS["36"]) for _ in self.val_names]

    def validation_step(self, batch: tuple[torch.Tensor, list[str]], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        if not labels:
            return
        out = self.model.decode(images)
        results = self.model.tokenizer.decode(out.logits.float().softmax(-1), out.lengths.tolist())
        self._scores[dataloader_idx].update([r.text for r in results], labels, [r.confidence for r in results])

    def on_validation_epoch_end(self) -> None:
        combined = Scores(CHARSETS["36"])
        for name, scores in zip(self.val_names, self._scores, strict=True):
            self.log(f"val/{name}/accuracy", scores.accuracy, add_dataloader_idx=False)
            self.log(f"val/{name}/1-ned", scores.one_minus_ned, add_dataloader_idx=False)
            self.log(f"val/{name}/confidence", scores.confidence, add_dataloader_idx=False)
            combined.merge(scores)
        if self.val_names:
            self.log("val_accuracy", combined.accuracy, prog_bar=True, add_dataloader_idx=False)
            if self.trainer.is_global_zero and not self.trainer.sanity_checking:
                # One line per validation in the run's log (the progress bar shows it only on a terminal).
                parts = ", ".join(f"{name} {s.accuracy:.1f}% of {s.n}" for name, s in zip(self.val_names,
                                                                                        self._scores, strict=True))
                print(f"step {self.global_step}: validation word accuracy {parts}", file=sys.stderr, flush=True)
