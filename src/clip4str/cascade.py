"""The decoding cascade of both backends: a row whose image-branch reading equals the CTC head's and is confident
enough is given as the image branch reads it, without the cross-modal branch (its text encoder call, memory and
passes) or rescoring, which would have nothing to choose between. NumPy only (the ONNX backend has no PyTorch).

Why: on the built-in model's realtrain holdout the cross branch never changed such a reading (docs/
training-builtin.md), and it is most of the decoding time of a read.
"""

from __future__ import annotations

import numpy as np

from clip4str.runaway import ctc_greedy


def confident_rows(ids: np.ndarray, top_probs: np.ndarray, lengths: np.ndarray, ctc_log_probs: np.ndarray, eos: int,
                   threshold: float) -> np.ndarray:
    """Rows (B,) whose greedy image-branch ids (B, L), with the probability of each (B, L) and valid `lengths`
    (B,), end with EOS, read as the CTC head's best path of (B, W, C) log-probabilities, and have a confidence
    (the product of the probabilities up to EOS, as `Tokenizer.decode` gives it) of at least `threshold`.
    Empty readings are never confident."""
    ctc = [chars for chars, _ in ctc_greedy(ctc_log_probs, eos)]
    out = np.zeros(len(ids), dtype=bool)
    for b, (row, n) in enumerate(zip(ids.tolist(), lengths.tolist(), strict=True)):
        row = row[:n]
        if eos not in row:
            continue
        end = row.index(eos)
        if end and row[:end] == ctc[b]:
            out[b] = float(np.prod(np.asarray(top_probs[b, :end + 1], dtype=np.float64))) >= threshold
    return out
