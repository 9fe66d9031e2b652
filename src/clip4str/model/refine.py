"""Cloze refinement of a one-layer decoder through the step tables, and the refinement a draft check computes in
its own pass (`Refined`: it holds when the first pass reads the draft, as it does for most crops)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clip4str.model.decoder import KV, Decoder
from clip4str.model.permutations import cloze_query_mask
from clip4str.model.static_step import StepTables, cloze_pass


def after_bos(tokens: torch.Tensor, bos: int) -> torch.Tensor:
    """Decoder input (B, 1 + L): BOS, then `tokens` (B, L)."""
    return torch.cat([torch.full((tokens.shape[0], 1), bos, dtype=tokens.dtype, device=tokens.device), tokens], 1)


def refine_context(ids: torch.Tensor, lengths: torch.Tensor, bos: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement input (B, L) of a first pass's greedy ids (B, L) and lengths (B,): BOS, then the ids but the
    last; and its padding (B, L): True from the first EOS on and past each row's length."""
    context = after_bos(ids[:, :-1], bos)
    positions = torch.arange(context.shape[1], device=ids.device)
    return context, ((context == eos).cumsum(-1) > 0) | (positions[None] >= lengths[:, None])


def refine_queries(padding: torch.Tensor, steps: int, queries: int) -> torch.Tensor:
    """Hidden mask (B, queries, L) of the first `queries` refinement queries over a context with `padding`."""
    return cloze_query_mask(steps, padding.shape[1], padding.device)[None, :queries] | padding[:, None]


@dataclass
class Refined:
    """Refinement logits of the first min(steps, L + 1) queries over `context` with `padding`, computed ahead."""

    context: torch.Tensor
    padding: torch.Tensor
    logits: torch.Tensor

    def holds(self, context: torch.Tensor, padding: torch.Tensor) -> bool:
        """Whether these are the logits of a refinement over `context` with `padding` (its only inputs besides
        the decoder's memory, which the caller keeps the same). Padded tokens are hidden from every query, so
        they may differ (after a row's EOS, a first pass's tokens are unspecified)."""
        return self.context.shape == context.shape and bool(torch.equal(self.padding, padding)) and \
            bool(torch.equal(self.context.masked_fill(padding, 0), context.masked_fill(padding, 0)))


def table_refine(decoder: Decoder, memory_kv: list[KV], context: torch.Tensor, padding: torch.Tensor, steps: int,
                 eos: int, tables: StepTables, ahead: Refined | None = None) -> torch.Tensor:
    """Refinement logits (B, <= steps, C) of a one-layer decoder; `ahead`'s where they hold."""
    # Its queries are independent: those past every row's first EOS are computed only if a row has none before
    # them (the positions after a reading's EOS are never read).
    width = min(steps, context.shape[1] + 1)
    if ahead is not None and ahead.logits.shape[1] == width and ahead.holds(context, padding):
        out = ahead.logits
    else:
        out = cloze_pass(decoder, context, refine_queries(padding, steps, width), memory_kv, tables)
    if width < steps and not bool((out.argmax(-1) == eos).any(-1).all()):
        rest = refine_queries(padding, steps, steps)[:, width:]
        out = torch.cat([out, cloze_pass(decoder, context, rest, memory_kv, tables, width)], dim=1)
    return out
