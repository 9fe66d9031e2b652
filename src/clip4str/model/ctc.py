"""The CTC head over the image tokens' columns: its training loss, and in decoding the runaway guard and joint
rescoring (`clip4str.runaway`, `clip4str.rescore`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip4str import rescore
from clip4str.charset import Tokenizer
from clip4str.model.permutations import causal_masks
from clip4str.runaway import ctc_greedy, find_runaways, reading_as_logits


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


@torch.no_grad()
def guard_runaways(logits: torch.Tensor, lengths: torch.Tensor, head: nn.Linear, memory: torch.Tensor,
                   grid: tuple[int, int], eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip4str.runaway.apply_guard` on tensors: runaway rows read by the CTC head instead."""
    found = find_runaways(logits.argmax(-1).tolist(), lengths.tolist(), eos,
                          lambda: column_log_probs(head, memory, grid).cpu().numpy(),
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


def teacher_forced_logits(decoder: nn.Module, memory_kv: list, owner: list[int], tgt_in: torch.Tensor,
                          tokenizer: Tokenizer) -> torch.Tensor:
    """Left-to-right teacher-forced logits (N, L, C) of decoder inputs `tgt_in`, row n over memory row owner[n]."""
    index = torch.tensor(owner, device=tgt_in.device)
    mask, _ = causal_masks(tgt_in.shape[1], tgt_in.device)
    padding = (tgt_in == tokenizer.pad_id) | (tgt_in == tokenizer.eos_id)
    kv = [(k[index], v[index]) for k, v in memory_kv]
    return decoder(tgt_in, kv, mask, padding, query_mask=mask)


@torch.no_grad()
def joint_rescore(out: tuple[torch.Tensor, ...], image_decoder: nn.Module, image_kv: list,
                  cross_decoder: nn.Module | None, cross_kv: list | None, head: nn.Linear, memory: torch.Tensor,
                  grid: tuple[int, int], tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip4str.rescore` on tensors: out = (final logits, lengths, image-branch logits, lengths)."""
    logits, lengths, image_logits, image_lengths = out
    eos = tokenizer.eos_id
    log_probs = column_log_probs(head, memory, grid).cpu().numpy()
    max_chars = image_decoder.pos_queries.shape[1] - 1  # the position queries bound a teacher-forced input
    cands = rescore.candidates(rescore.readings(logits.argmax(-1).tolist(), lengths.tolist(), eos),
                               rescore.readings(image_logits.argmax(-1).tolist(), image_lengths.tolist(), eos),
                               [chars for chars, _ in ctc_greedy(log_probs, eos)], max_chars)
    if not cands.owner:
        return logits, lengths
    tgt_in, targets = cands.teacher_forcing(tokenizer.bos_id, eos, tokenizer.pad_id)
    tgt_in = torch.from_numpy(tgt_in).to(memory.device)
    image = teacher_forced_logits(image_decoder, image_kv, cands.owner, tgt_in, tokenizer).float().cpu().numpy()
    cross = None if cross_decoder is None else \
        teacher_forced_logits(cross_decoder, cross_kv, cands.owner, tgt_in, tokenizer).float().cpu().numpy()
    found = rescore.choose(cands, image, cross, log_probs, targets, eos, tokenizer.pad_id)
    return replace_rows(logits, lengths, found, eos)
