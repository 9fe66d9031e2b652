"""Permuted sequence modelling (PSM): permutation sampling and the attention masks of a permutation."""

from __future__ import annotations

import math
from itertools import permutations

import torch

# For 4 characters with mirroring, the pool of 12 permutations whose mirrors are not already in it.
_MIRRORED_POOL_4 = [0, 3, 4, 6, 9, 10, 12, 16, 17, 18, 19, 21]


def generate_permutations(max_chars: int, num_perms: int = 6, forward: bool = True, mirrored: bool = True,
                          generator: torch.Generator | None = None, device: torch.device | None = None
                          ) -> torch.Tensor:
    """Permutations (P, max_chars + 2) over [BOS, characters, EOS], BOS first and EOS last.

    Row 0 is the identity; with mirroring every sampled permutation is followed by its mirror, and row 1
    becomes the full reverse with EOS first, so EOS is also learnt from an empty context.
    """
    if max_chars < 1:
        raise ValueError("permutations need at least one character position")
    if max_chars == 1:
        return torch.arange(3, device=device).unsqueeze(0)
    perms = [torch.arange(max_chars)] if forward else []
    max_perms = math.factorial(max_chars) // (2 if mirrored else 1)
    num_gen = min(num_perms // 2 if mirrored else num_perms, max_perms)
    if max_chars < 5:
        selector = _MIRRORED_POOL_4 if max_chars == 4 and mirrored else list(range(max_perms))
        pool = torch.as_tensor(list(permutations(range(max_chars), max_chars)))[selector]
        if forward:
            pool = pool[1:]
        if len(pool) and num_gen > len(perms):
            pick = torch.randperm(len(pool), generator=generator)[: num_gen - len(perms)]
            perms.extend(pool[pick])
    else:
        perms.extend(torch.randperm(max_chars, generator=generator) for _ in range(num_gen - len(perms)))
    out = torch.stack(perms)
    if mirrored:
        out = torch.stack([out, out.flip(-1)]).transpose(0, 1).reshape(-1, max_chars)
    bos = out.new_zeros(len(out), 1)
    eos = torch.full_like(bos, max_chars + 1)
    out = torch.cat([bos, out + 1, eos], dim=1)
    if len(out) > 1:
        out[1, 1:] = max_chars + 1 - torch.arange(max_chars + 1)
    return out.to(device)


def permutation_masks(perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (True = hidden) of a permutation (S,) or of several (P, S): content and query, each (L, L) or
    (P, L, L), L = S - 1.

    Position perm[i] may not see perm[i+1:]; the query stream also may not see its own position.
    """
    # Position a may not see b where b comes later in the permutation: rank[b] > rank[a], rank = the inverse
    # permutation. Tensor ops only, so on a GPU building the masks never waits for the device.
    rank = perm.argsort(-1)
    hidden = rank.unsqueeze(-2) > rank.unsqueeze(-1)
    content = hidden[..., :-1, :-1]
    hidden = hidden | torch.eye(perm.shape[-1], dtype=torch.bool, device=perm.device)
    return content, hidden[..., 1:, :-1]


def causal_masks(length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the left-to-right order: (content, query), both (L, L)."""
    hidden = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return hidden, hidden


def cloze_query_mask(num_queries: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """Refinement query mask (Lq, L): query i sees every context position except i + 1, its own target."""
    hidden = torch.zeros(num_queries, length, dtype=torch.bool, device=device)
    idx = torch.arange(min(num_queries, length - 1), device=device)
    hidden[idx, idx + 1] = True
    return hidden
