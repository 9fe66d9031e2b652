"""The runaway guard of both backends: a greedy reading that never ends or repeats one character to the length
limit is replaced by the CTC head's reading of the image columns. NumPy only (the ONNX backend has no PyTorch)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

# A run this long of one character is taken as a runaway reading unless the CTC reading has one too: 1 of the
# 7,820 real training labels has such a run ('544444').
RUNAWAY_RUN = 5


def longest_run(ids: Sequence[int]) -> int:
    """Length of the longest run of one id."""
    return max((len(list(group)) for _, group in itertools.groupby(ids)), default=0)


def ctc_greedy(log_probs: np.ndarray, blank: int) -> list[tuple[list[int], list[float]]]:
    """Best-path CTC reading of each row of (B, W, C) log-probabilities: (character ids, each character's
    probability at its best column)."""
    top_i, top_p = log_probs.argmax(-1), np.exp(log_probs.max(-1))
    out = []
    for ids, probs in zip(top_i.tolist(), top_p.tolist(), strict=True):
        chars, char_probs = [], []
        for c, group in itertools.groupby(zip(ids, probs, strict=True), key=lambda item: item[0]):
            if c != blank:
                chars.append(c)
                char_probs.append(max(p for _, p in group))
        out.append((chars, char_probs))
    return out


def find_runaways(ids: Sequence[Sequence[int]], lengths: Sequence[int], eos: int,
                  log_probs: Callable[[], np.ndarray]) -> dict[int, tuple[list[int], list[float]]]:
    """Rows whose greedy ids run away (no EOS within the row's length, or a run of RUNAWAY_RUN of one character)
    and whose CTC reading does not: row -> that CTC reading. `log_probs` gives the CTC head's (B, W, C) column
    log-probabilities; it is called only when some row runs away."""
    readings = None
    found = {}
    for b, (row, n) in enumerate(zip(ids, lengths, strict=True)):
        row = list(row[:n])
        ends = eos in row
        row = row[:row.index(eos)] if ends else row
        if ends and longest_run(row) < RUNAWAY_RUN:
            continue
        readings = readings if readings is not None else ctc_greedy(log_probs(), eos)
        chars, probs = readings[b]
        if chars and longest_run(chars) < RUNAWAY_RUN:
            found[b] = (chars, probs)
    return found


def reading_as_logits(chars: Sequence[int], probs: Sequence[float], classes: int, eos: int) -> np.ndarray:
    """(len + 1, classes) logits whose softmax gives each character its probability and then EOS, so the usual
    greedy decoding yields the text and a confidence from the CTC probabilities."""
    steps = [*zip(chars, probs, strict=True), (eos, 1.0)]
    out = np.empty((len(steps), classes), dtype=np.float32)
    for k, (c, p) in enumerate(steps):
        p = min(max(p, 1e-6), 1.0 - 1e-6)
        out[k] = np.log((1.0 - p) / (classes - 1))
        out[k, c] = np.log(p)
    return out


def apply_guard(logits: np.ndarray, lengths: np.ndarray, eos: int,
                log_probs: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Final (B, L, C) logits and lengths with runaway rows replaced by their CTC reading (unchanged if none)."""
    found = find_runaways(logits.argmax(-1).tolist(), lengths.tolist(), eos, log_probs)
    if not found:
        return logits, lengths
    rows = {b: reading_as_logits(c, p, logits.shape[-1], eos) for b, (c, p) in found.items()}
    width = max(logits.shape[1], *(len(r) for r in rows.values()))
    logits = np.pad(logits, ((0, 0), (0, width - logits.shape[1]), (0, 0)))
    lengths = lengths.copy()
    for b, row in rows.items():
        logits[b, :len(row)] = row
        lengths[b] = len(row)
    return logits, lengths
