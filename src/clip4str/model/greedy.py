"""Greedy autoregressive decoding loops of one decoder: the static step's (the default) and the reference's."""

from __future__ import annotations

import torch

from clip4str.charset import Tokenizer
from clip4str.model.decoder import Decoder
from clip4str.model.permutations import causal_masks
from clip4str.model.static_step import compiled_decoding_step, decoding_step, empty_caches, step_tables


def cached_greedy(decoder: Decoder, kv: list, steps: int, early_exit: bool, budget: torch.Tensor,
                  tokenizer: Tokenizer, compiled: bool = False) -> torch.Tensor:
    """Greedy logits (B, steps taken, C) over memory keys/values `kv`, with the static step (`static_step`); row b
    takes at most budget[b] steps."""
    b, device, tok = budget.shape[0], budget.device, tokenizer
    step = compiled_decoding_step(decoder) if compiled else decoding_step
    tables = step_tables(decoder, steps)
    caches = empty_caches(decoder, b, steps, kv[0][0])
    positions = torch.arange(steps, device=device)
    tokens = torch.full((b,), tok.bos_id, dtype=torch.long, device=device)
    done, finished, logits = budget <= 0, [], []
    # Stopping is checked on the host every few steps only where that costs a device sync.
    check_every = 1 if device.type == "cpu" else 4
    for i in range(int(budget.max())):
        out, caches = step(decoder, tokens, positions[i], kv, caches, tables)
        logits.append(out)
        tokens = out.argmax(-1)
        if early_exit:
            done = done | (tokens == tok.eos_id) | (budget <= i + 1)
            finished.append(done.all())
            if (i + 1) % check_every == 0 and bool(finished[-1]):
                break
    logits = torch.stack(logits, dim=1)
    if early_exit and check_every > 1:  # cut the steps taken after every row was done
        finished = torch.stack(finished)
        logits = logits[:, : int(finished.int().argmax()) + 1 if bool(finished.any()) else len(finished)]
    return logits


def recomputing_greedy(decoder: Decoder, kv: list, steps: int, early_exit: bool, budget: torch.Tensor,
                       tokenizer: Tokenizer) -> torch.Tensor:
    """The reference's loop: the whole prefix recomputed at every step (for benchmarks and tests)."""
    b, tok = budget.shape[0], tokenizer
    tgt = torch.full((b, steps), tok.pad_id, dtype=torch.long, device=budget.device)
    tgt[:, 0] = tok.bos_id
    mask, _ = causal_masks(steps, budget.device)
    logits = []
    for i in range(int(budget.max())):
        j = i + 1
        out = decoder(tgt[:, :j], kv, mask[:j, :j], query_start=i, query_len=1, query_mask=mask[i:j, :j])
        logits.append(out)
        if j < steps:
            tgt[:, j] = out.squeeze(1).argmax(-1)
            if early_exit and ((tgt == tok.eos_id).any(-1) | (budget <= j)).all():
                break
    return torch.cat(logits, dim=1)
