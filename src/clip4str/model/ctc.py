"""The CTC head over the image tokens' columns: its training loss, and the runaway guard of decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip4str.charset import Tokenizer
from clip4str.runaway import find_runaways, reading_as_logits


def column_log_probs(head: nn.Linear, memory: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image tokens (B, 1 + H*W, D) -> per-column log-probabilities (B, W, C), rows averaged."""
    gh, gw = grid
    columns = memory[:, -gh * gw:].unflatten(1, (gh, gw)).mean(1)  # patch tokens, class token dropped
    return head(columns).float().log_softmax(-1)


def ctc_loss(log_probs: torch.Tensor, tgt: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """CTC loss of encoded labels (B, L) given column log-probabilities; EOS's class is the blank."""
    chars = tgt[:, 1:]
    is_char = (chars != tokenizer.eos_id) & (chars != tokenizer.pad_id)
    lengths = is_char.sum(1)
    inputs = torch.full_like(lengths, log_probs.shape[1])
    # Words longer than the columns allow cannot be aligned: zero_infinity drops their term.
    return F.ctc_loss(log_probs.transpose(0, 1), chars[is_char], inputs, lengths, blank=tokenizer.eos_id,
                      zero_infinity=True)


def guard_runaways(logits: torch.Tensor, lengths: torch.Tensor, head: nn.Linear, memory: torch.Tensor,
                   grid: tuple[int, int], eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip4str.runaway.apply_guard` on tensors: runaway rows read by the CTC head instead."""
    found = find_runaways(logits.argmax(-1).tolist(), lengths.tolist(), eos,
                          lambda: column_log_probs(head, memory, grid).cpu().numpy(),
                          lambda: logits.float().softmax(-1).cpu().numpy())
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
