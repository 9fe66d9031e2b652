"""The runaway guard of both backends: a greedy reading that never ends or repeats one character to the length
limit is replaced by the CTC head's reading of the image columns, or cut where it starts to repeat. NumPy only
(the ONNX backend has no PyTorch)."""

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


def run_start(ids: Sequence[int]) -> int | None:
    """Index where the first run of RUNAWAY_RUN of one id starts, or None."""
    for k in range(len(ids) - RUNAWAY_RUN + 1):
        if len(set(ids[k:k + RUNAWAY_RUN])) == 1:
            return k
    return None


def find_runaways(ids: Sequence[Sequence[int]], lengths: Sequence[int], eos: int,
                  log_probs: Callable[[], np.ndarray], probs: Callable[[], np.ndarray]
                  ) -> dict[int, tuple[list[int], list[float]]]:
    """Rows whose greedy ids run away (no EOS within the row's length, or a run of RUNAWAY_RUN of one character):
    row -> the reading to give instead, as (character ids, probabilities with EOS's last). That is the CTC
    reading when it has characters and no such run; else the greedy reading cut after the first character of
    its run, ending with the probability the decoder gave EOS there (so the confidence stays as low as it was).
    `log_probs` gives the CTC head's (B, W, C) column log-probabilities and `probs` the decoder's (B, L, C)
    probabilities; they are computed only when some row runs away."""
    ctc = greedy = None
    found = {}
    for b, (row, n) in enumerate(zip(ids, lengths, strict=True)):
        row = list(row[:n])
        ends = eos in row
        row = row[:row.index(eos)] if ends else row
        start = run_start(row)
        if ends and start is None:
            continue
        ctc = ctc if ctc is not None else ctc_greedy(log_probs(), eos)
        chars, char_probs = ctc[b]
        if chars and run_start(chars) is None:
            found[b] = (chars, [*char_probs, 1.0])
            continue
        greedy = greedy if greedy is not None else probs()
        cut = len(row) if start is None else start + 1
        kept = [float(greedy[b, k, c]) for k, c in enumerate(row[:cut])]
        found[b] = (row[:cut], [*kept, float(greedy[b, cut, eos]) if cut < greedy.shape[1] else 0.0])
    return found


def reading_as_logits(chars: Sequence[int], probs: Sequence[float], classes: int, eos: int) -> np.ndarray:
    """(len + 1, classes) logits whose greedy decoding is `chars` then EOS, each step with its probability in
    `probs` (len + 1 values, EOS's last). A probability below 1.5 / classes is raised to it: below 1 / classes
    no distribution has that class as its most likely one."""
    out = np.empty((len(chars) + 1, classes), dtype=np.float32)
    for k, (c, p) in enumerate(zip([*chars, eos], probs, strict=True)):
        p = min(max(p, 1.5 / classes), 1.0 - 1e-6)
        out[k] = np.log((1.0 - p) / (classes - 1))
        out[k, c] = np.log(p)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def apply_guard(logits: np.ndarray, lengths: np.ndarray, eos: int,
                log_probs: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Final (B, L, C) logits and lengths with runaway rows replaced (`find_runaways`; unchanged if none)."""
    found = find_runaways(logits.argmax(-1).tolist(), lengths.tolist(), eos, log_probs,
                          lambda: softmax(logits.astype(np.float64)))
    return replace_rows(logits, lengths, found, eos)


def replace_rows(logits: np.ndarray, lengths: np.ndarray, found: dict[int, tuple[list[int], list[float]]],
                 eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, L, C) logits and lengths with rows replaced by readings (row -> (chars, probabilities with EOS's))."""
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
