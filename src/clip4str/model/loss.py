"""The training loss of a CLIP4STR module: permutation language modelling of both branches, plus CTC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from clip4str.model import ctc
from clip4str.model.permutations import permutation_masks

if TYPE_CHECKING:
    from clip4str.model.clip4str import CLIP4STR


@dataclass
class LossOutput:
    """Training loss (image branch + weight x cross branch) and its two parts, each averaged over targets."""

    loss: torch.Tensor
    image_loss: torch.Tensor
    cross_loss: torch.Tensor | None
    ctc_loss: torch.Tensor | None = None


def permutation_loss(model: CLIP4STR, memory: torch.Tensor, tgt: torch.Tensor, perms: torch.Tensor,
                     lengths: torch.Tensor | None = None) -> LossOutput:
    """The loss of image tokens `memory` (B, N, D) for encoded labels `tgt` (B, L) under permutations `perms` (the
    cross branch gets the true context); `lengths`: the labels' character counts for the CTC loss, on the host
    (`ctc.label_lengths`)."""
    pad, eos = model.tokenizer.pad_id, model.tokenizer.eos_id
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    padding = (tgt_in == pad) | (tgt_in == eos)
    content_masks, query_masks = permutation_masks(perms)
    image_logits = model.image_decoder.forward_permutations(tgt_in, memory, content_masks, query_masks, padding)
    cross_logits = None
    if model.cross_decoder is not None:
        # One text-encoder call for the captions of every permutation (B * P captions), each distinct caption
        # tokenized and encoded once: the permutations mostly agree, so that is about 1 / P of the work
        # (the text tower treats rows alone, so results and gradients are the same).
        captions = model.captions(image_logits.flatten(0, 1))
        distinct = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        rows = torch.tensor([distinct[c] for c in captions], device=memory.device)
        text = model.encode_text(list(distinct), memory.device).to(memory.dtype)[rows]
        text = text.view(len(tgt), len(perms), *text.shape[1:])
        cross_logits = model.cross_decoder.forward_permutations(tgt_in, memory.detach(), content_masks,
                                                               query_masks, padding, perm_memory=text)
    n = (tgt_out != pad).sum()
    image_sum = cross_sum = numel = 0
    for i in range(len(perms)):
        image_sum = image_sum + n * F.cross_entropy(image_logits[:, i].flatten(0, 1), tgt_out.flatten(),
                                                    ignore_index=pad)
        if cross_logits is not None:
            cross_sum = cross_sum + n * F.cross_entropy(cross_logits[:, i].flatten(0, 1), tgt_out.flatten(),
                                                        ignore_index=pad)
        numel = numel + n
        if i == 1:  # only the first two permutations learn EOS
            tgt_out = torch.where(tgt_out == eos, pad, tgt_out)
            n = (tgt_out != pad).sum()
    image_loss = image_sum / numel
    cross_loss = cross_sum / numel if cross_logits is not None else None
    loss = image_loss if cross_loss is None else image_loss + model.config.cross_loss_weight * cross_loss
    ctc_loss = None
    if model.ctc_head is not None:
        ctc_loss = ctc.ctc_loss(ctc.column_log_probs(model.ctc_head, memory, model.clip.visual.grid_size), tgt,
                                model.tokenizer, lengths)
    if ctc_loss is not None:
        loss = loss + model.config.ctc_weight * ctc_loss
    return LossOutput(loss, image_loss, cross_loss, ctc_loss)
