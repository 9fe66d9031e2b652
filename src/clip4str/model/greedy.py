"""Greedy autoregressive decoding loops of one decoder: the static step's (the default, optionally starting from
a checked draft) and the reference's."""

from __future__ import annotations

import torch

from clip4str.charset import Tokenizer
from clip4str.draft import Settled, settle
from clip4str.model.decoder import KV, Decoder
from clip4str.model.permutations import causal_masks
from clip4str.model.refine import Refined, after_bos, refine_context, refine_queries
from clip4str.model.static_step import (
    StepTables,
    cloze_pass,
    compiled_decoding_step,
    decoding_step,
    empty_caches,
    step_tables,
)


def check_draft(decoder: Decoder, kv: list[KV], draft: torch.Tensor, budget: torch.Tensor, tables: StepTables,
                bos: int, eos: int, refine_steps: int = 0) -> tuple[torch.Tensor, Settled, Refined | None]:
    """Logits (B, width, C) of a draft (B, n) of next tokens scored in one pass, what they settle
    (`clip4str.draft.settle`) and, with refine_steps, the refinement of the draft read as the first pass's
    reading, computed in the same pass (its queries join the check's over the same context)."""
    b, n = draft.shape
    hidden = torch.ones(n, n, dtype=torch.bool, device=draft.device).triu(1).expand(b, n, n)
    queries = torch.arange(n, device=draft.device)
    if refine_steps:
        # As `_first_pass` would give them if it reads the draft (`Refined.holds` finds out whether it does).
        is_eos = draft == eos
        lengths = torch.minimum(torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, n), budget)
        context, padding = refine_context(draft, lengths, bos, eos)
        width = min(refine_steps, n + 1)
        hidden = torch.cat([hidden, refine_queries(padding, refine_steps, width)], dim=1)
        queries = torch.cat([queries, torch.arange(width, device=draft.device)])
    else:
        context = after_bos(draft[:, :-1], bos)
    logits = cloze_pass(decoder, context, hidden, kv, tables, queries)
    ahead = Refined(context, padding, logits[:, n:]) if refine_steps else None
    logits = logits[:, :n]
    settled = settle(logits.argmax(-1).cpu().numpy(), draft.cpu().numpy(), budget.cpu().numpy(), eos)
    return logits[:, :settled.width], settled, ahead


def _prefill(decoder: Decoder, caches: list[KV], predicted: torch.Tensor, start: int, tables: StepTables, bos: int
             ) -> list[KV]:
    """A one-layer decoder's caches with the keys and values of content positions [0, start): BOS, then the
    tokens `predicted` (B, >= start - 1) at positions 0 .. start - 2."""
    context = after_bos(predicted[:, :start - 1], bos)
    positions = torch.arange(start, device=predicted.device)
    attn = decoder.layers[0].self_attn
    k, v = (attn._heads(t[context, positions]) for t in (tables.keys, tables.values))
    (k_cache, v_cache), = caches
    return [(k_cache.index_copy(2, positions, k.to(k_cache.dtype)), v_cache.index_copy(2, positions,
                                                                                       v.to(v_cache.dtype)))]


def cached_greedy(decoder: Decoder, kv: list, steps: int, early_exit: bool, budget: torch.Tensor,
                  tokenizer: Tokenizer, compiled: bool = False, draft: torch.Tensor | None = None,
                  refine: bool = False) -> tuple[torch.Tensor, Refined | None]:
    """Greedy logits (B, steps taken, C) over memory keys/values `kv`, with the static step (`static_step`); row b
    takes at most budget[b] steps.

    draft (B, n): guessed next tokens (EOS-terminated). A one-layer decoder checks them in one pass
    (`check_draft`, `clip4str.draft`) and steps only from the first position where a row was wrong; the logits
    up to each row's stop are greedy decoding's (within rounding), those after it are unspecified. With refine,
    a checked draft that needs no step also gives its first refinement over `steps` queries, else None.
    """
    b, device, tok = budget.shape[0], budget.device, tokenizer
    step = compiled_decoding_step(decoder) if compiled else decoding_step
    tables = step_tables(decoder, steps)
    caches = empty_caches(decoder, b, steps, kv[0][0])
    positions = torch.arange(steps, device=device)
    tokens = torch.full((b,), tok.bos_id, dtype=torch.long, device=device)
    done, start, settled = budget <= 0, 0, None
    limit = int(budget.max())
    if draft is not None and early_exit and len(decoder.layers) == 1 and limit > 0:
        draft = draft[:, :limit].to(device)
        settled, checked, ahead = check_draft(decoder, kv, draft, budget, tables, tok.bos_id, tok.eos_id,
                                              steps if refine else 0)
        if checked.finished:
            return settled, ahead
        start, done = checked.width, torch.from_numpy(checked.done).to(device)
        # Greedy's own tokens (the draft's where it held): rows already finished go on as the step loop would.
        predicted = settled.argmax(-1)
        caches = _prefill(decoder, caches, predicted, start, tables, tok.bos_id)
        tokens = predicted[:, -1]
    finished, logits = [], []
    # Stopping is checked on the host every few steps only where that costs a device sync.
    check_every = 1 if device.type == "cpu" else 4
    for i in range(start, limit):
        out, caches = step(decoder, tokens, positions[i], kv, caches, tables)
        logits.append(out)
        tokens = out.argmax(-1)
        if early_exit:
            done = done | (tokens == tok.eos_id) | (budget <= i + 1)
            finished.append(done.all())
            if (i + 1 - start) % check_every == 0 and bool(finished[-1]):
                break
    logits = torch.stack(logits, dim=1)
    if early_exit and check_every > 1:  # cut the steps taken after every row was done
        finished = torch.stack(finished)
        logits = logits[:, : int(finished.int().argmax()) + 1 if bool(finished.any()) else len(finished)]
    return (logits if settled is None else torch.cat([settled.to(logits.dtype), logits], dim=1)), None


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
