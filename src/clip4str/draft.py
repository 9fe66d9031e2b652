"""Drafted greedy decoding, the part both backends share (NumPy only): a decoder scores a draft of the next
tokens in one teacher-forced pass, and its greedy logits are settled up to each row's first position where it
disagrees with the draft (speculative decoding with the decoder as its own judge: the readings are greedy
decoding's). The image branch's draft is the CTC head's reading, the cross branch's the image branch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip4str.runaway import ctc_greedy


def ctc_drafts(log_probs: np.ndarray, eos: int) -> np.ndarray:
    """Best-path CTC readings of (B, W, C) column log-probabilities as EOS-terminated rows (B, n) of token ids."""
    readings = [chars for chars, _ in ctc_greedy(log_probs, eos)]
    rows = np.full((len(readings), max(map(len, readings)) + 1), eos, dtype=np.int64)
    for b, chars in enumerate(readings):
        rows[b, :len(chars)] = chars
    return rows


@dataclass
class Settled:
    """What a checked draft settled: the greedy logits of its first `width` positions are final; `done` rows
    stop within them; `finished` = every row does (no step is needed)."""

    width: int
    done: np.ndarray
    finished: bool


def settle(predicted: np.ndarray, draft: np.ndarray, budget: np.ndarray, eos: int) -> Settled:
    """Greedy tokens `predicted` (B, n) of a pass teacher-forced on `draft` (B, n) -> what is settled; a row
    takes at most budget[b] steps and stops after its first EOS."""
    n = draft.shape[1]
    held = np.cumprod(predicted == draft, axis=1).sum(1)  # leading positions where decoder and draft agree
    valid = np.minimum(held + 1, n)                        # ... and the first disagreement: greedy's token there
    is_eos = predicted == eos
    stop = np.minimum(np.where(is_eos.any(1), is_eos.argmax(1) + 1, n + 1), budget)
    settled = stop <= valid
    if settled.all():
        return Settled(int(stop.max()), settled, True)
    width = int(valid[~settled].min())
    return Settled(width, stop <= width, False)
