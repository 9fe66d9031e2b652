"""Joint rescoring of both backends: where the final, image-branch and CTC readings of a crop differ, each of
them is scored by the image decoder, the cross-modal decoder (teacher-forced, left to right) and the CTC head,
and the reading with the highest sum of the three log-probabilities is given. NumPy only (the ONNX backend has
no PyTorch); the backends run the decoder passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from clip4str.runaway import ctc_greedy

# (decoder input (N, L), the memory row of each input, padding mask (N, L)) -> the image decoder's and the
# cross-modal decoder's (None without one) teacher-forced logits (N, L, C), as NumPy arrays
ForcedPass = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def readings(ids: Sequence[Sequence[int]], lengths: Sequence[int], eos: int) -> list[list[int] | None]:
    """Greedy ids of each row up to its first EOS within its length; None where it has no EOS (a runaway)."""
    out = []
    for row, n in zip(ids, lengths, strict=True):
        row = list(row[:n])
        out.append(row[:row.index(eos)] if eos in row else None)
    return out


@dataclass
class Candidates:
    """Distinct non-empty readings of the rows that have more than one; a row's first is its final reading."""

    owner: list[int]
    chars: list[list[int]]

    def teacher_forcing(self, bos: int, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoder input (N, L) = [BOS, chars, EOS, pad...][:-1] and the targets (N, L) = [chars, EOS, pad...]."""
        width = max(len(c) for c in self.chars) + 2
        tgt = np.full((len(self.chars), width), pad, dtype=np.int64)
        for n, chars in enumerate(self.chars):
            tgt[n, :len(chars) + 2] = [bos, *chars, eos]
        return tgt[:, :-1], tgt[:, 1:]


def candidates(finals: list[list[int] | None], images: list[list[int] | None], ctcs: list[list[int]],
               max_chars: int) -> Candidates:
    """The rows where the three readings do not all agree. A final reading that is empty or never ended (None:
    the runaway guard's case) is left as it is; readings that never ended or are longer than `max_chars` are not
    candidates."""
    owner, chars = [], []
    for b, readings_b in enumerate(zip(finals, images, ctcs, strict=True)):
        kept = (tuple(r) for r in readings_b if r is not None and 0 < len(r) <= max_chars)
        distinct = [list(r) for r in dict.fromkeys(kept)]
        if len(distinct) > 1 and distinct[0] == finals[b]:
            owner += [b] * len(distinct)
            chars += distinct
    return Candidates(owner, chars)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in float64."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ctc_log_likelihood(log_probs: np.ndarray, chars: Sequence[int], blank: int) -> float:
    """log P(chars) under CTC of (W, C) column log-probabilities (the forward algorithm); -inf if it cannot fit."""
    ext = [blank]
    for c in chars:
        ext += [c, blank]
    alpha = np.full(len(ext), -np.inf)
    alpha[0] = log_probs[0, blank]
    if len(ext) > 1:
        alpha[1] = log_probs[0, ext[1]]
    # A label may skip the blank between two different characters.
    skip = np.array([s >= 2 and ext[s] != blank and ext[s] != ext[s - 2] for s in range(len(ext))])
    for t in range(1, log_probs.shape[0]):
        stay, step = alpha, np.concatenate([[-np.inf], alpha[:-1]])
        jump = np.where(skip, np.concatenate([[-np.inf, -np.inf], alpha[:-2]]), -np.inf)
        alpha = np.logaddexp(np.logaddexp(stay, step), jump) + log_probs[t, ext]
    return float(np.logaddexp(alpha[-1], alpha[-2]) if len(ext) > 1 else alpha[-1])


def choose(cands: Candidates, image_logits: np.ndarray, cross_logits: np.ndarray | None, ctc_log_probs: np.ndarray,
           targets: np.ndarray, blank: int, pad: int) -> dict[int, tuple[list[int], list[float]]]:
    """Rows whose best-scoring candidate is not their final reading: row -> (chars, probabilities of each
    character and of EOS under the decoder that gives the final reading: the cross-modal one where there is).

    image_logits / cross_logits: the decoders' teacher-forced (N, L, C) logits of the candidates; targets:
    `Candidates.teacher_forcing`'s; ctc_log_probs: the CTC head's (B, W, C) column log-probabilities."""
    valid = targets != pad
    rows = np.arange(len(targets))[:, None]
    parts = [log_softmax(x)[rows, np.arange(targets.shape[1])[None], np.where(valid, targets, 0)]
             for x in (image_logits, cross_logits) if x is not None]
    scores = sum((p * valid).sum(-1) for p in parts)
    scores = scores + np.array([ctc_log_likelihood(ctc_log_probs[b], c, blank)
                                for b, c in zip(cands.owner, cands.chars, strict=True)])
    found = {}
    for b in dict.fromkeys(cands.owner):
        mine = [n for n, o in enumerate(cands.owner) if o == b]
        best = max(mine, key=lambda n: scores[n])
        if best != mine[0]:
            length = len(cands.chars[best]) + 1
            found[b] = (cands.chars[best], np.exp(parts[-1][best, :length]).tolist())
    return found


def rescore_rows(final: tuple[np.ndarray, np.ndarray], image: tuple[np.ndarray, np.ndarray],
                 ctc_log_probs: np.ndarray, max_chars: int, bos: int, eos: int, pad: int, forced: ForcedPass
                 ) -> dict[int, tuple[list[int], list[float]]]:
    """The whole rescoring of a batch: (greedy ids, lengths) of the final and image-branch readings, the CTC
    head's (B, W, C) log-probabilities and the backend's teacher-forced pass -> rows to replace (`choose`)."""
    cands = candidates(readings(final[0].tolist(), final[1].tolist(), eos),
                       readings(image[0].tolist(), image[1].tolist(), eos),
                       [chars for chars, _ in ctc_greedy(ctc_log_probs, eos)], max_chars)
    if not cands.owner:
        return {}
    tgt_in, targets = cands.teacher_forcing(bos, eos, pad)
    image_logits, cross_logits = forced(tgt_in, np.array(cands.owner), (tgt_in == pad) | (tgt_in == eos))
    return choose(cands, image_logits, cross_logits, ctc_log_probs, targets, eos, pad)
