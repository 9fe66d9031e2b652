"""The CTC head over the image tokens' columns: its training loss, and in decoding the runaway guard and joint
rescoring (`clip4str.runaway`, `clip4str.rescore`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip4str import rescore
from clip4str.charset import Tokenizer
from clip4str.model.permutations import causal_masks
from clip4str.runaway import find_runaways, reading_as_logits


def column_log_probs(head: nn.Linear, memory: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image tokens (B, 1 + H*W, D) -> per-column log-probabilities (B, W, C), rows averaged."""
    gh, gw = grid
    columns = memory[:, -gh * gw:].unflatten(1, (gh, gw)).mean(1)  # patch tokens, class token dropped
    return head(columns).float().log_softmax(-1)


def label_lengths(tgt: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """Characters of each encoded label (B, L): [BOS, characters, EOS, padding]."""
    chars = tgt[:, 1:]
    return ((chars != tokenizer.eos_id) & (chars != tokenizer.pad_id)).sum(1)


def ctc_loss(log_probs: torch.Tensor, tgt: torch.Tensor, tokenizer: Tokenizer, lengths: torch.Tensor | None = None
             ) -> torch.Tensor:
    """CTC loss of encoded labels (B, L) given column log-probabilities; EOS's class is the blank. `lengths`:
    `label_lengths(tgt)`, computed where the labels were made (PyTorch reads the lengths on the host, so lengths
    on a GPU would make it wait for the device)."""
    lengths = label_lengths(tgt, tokenizer) if lengths is None else lengths
    inputs = torch.full_like(lengths, log_probs.shape[1])
    # The padded (B, S) form of the targets: picking the characters out would be a host sync on a GPU too.
    # Words longer than the columns allow cannot be aligned: zero_infinity drops their term.
    return F.ctc_loss(log_probs.transpose(0, 1), tgt[:, 1:], inputs, lengths, blank=tokenizer.eos_id,
                      zero_infinity=True)


@torch.no_grad()
def guard_runaways(logits: torch.Tensor, lengths: torch.Tensor, log_probs: Callable[[], np.ndarray], eos: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip4str.runaway.apply_guard` on tensors: runaway rows read by the CTC head (`log_probs()`) instead."""
    found = find_runaways(logits.argmax(-1).tolist(), lengths.tolist(), eos, log_probs,
                          lambda: logits.float().softmax(-1).cpu().numpy())
    return replace_rows(logits, lengths, found, eos)


def replace_rows(logits: torch.Tensor, lengths: torch.Tensor, found: dict[int, tuple[list[int], list[float]]],
                 eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip4str.runaway.replace_rows` on tensors."""
    if not found:
        return logits, lengths
    rows = {b: torch.from_numpy(reading_as_logits(c, p, logits.shape[-1], eos)) for b, (c, p) in found.items()}
    width = max(logits.shape[1], *(len(r) for r in rows.values()))
    logits = F.pad(logits, (0, 0, 0, width - logits.shape[1])).clone()
    lengths = lengths.clone()
    for b, row in rows.items():
        logits[b, :len(row)] = row.to(logits)
        lengths[b] = len(row)
    return logits, lengths


@torch.no_grad()
def joint_rescore(out: tuple[torch.Tensor, ...], decoders: list[tuple[nn.Module, list] | None],
                  log_probs: np.ndarray, max_chars: int, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip4str.rescore.rescore_rows` on tensors: out = (final logits, lengths, image-branch logits, lengths);
    decoders = [(image decoder, its memory keys/values), (cross decoder, its) or None]."""
    logits, lengths, image_logits, image_lengths = out

    def forced(tgt_in: np.ndarray, owner: np.ndarray, padding: np.ndarray) -> tuple:
        device = logits.device
        tgt, pad = torch.from_numpy(tgt_in).to(device), torch.from_numpy(padding).to(device)
        index = torch.from_numpy(owner).to(device)
        mask, _ = causal_masks(tgt.shape[1], device)
        return tuple(None if d is None else d[0](tgt, [(k[index], v[index]) for k, v in d[1]], mask, pad,
                                                  query_mask=mask).float().cpu().numpy() for d in decoders)

    found = rescore.rescore_rows((logits.argmax(-1).cpu().numpy(), lengths.cpu().numpy()),
                                 (image_logits.argmax(-1).cpu().numpy(), image_lengths.cpu().numpy()), log_probs,
                                 max_chars, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, forced)
    return replace_rows(logits, lengths, found, tokenizer.eos_id)
