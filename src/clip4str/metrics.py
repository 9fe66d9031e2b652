"""Recognition metrics of the reference protocol: word accuracy, 1 - NED, confidence, label length."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from clip4str.charset import CharsetAdapter


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@dataclass
class Scores:
    """Running sums for one dataset; both prediction and label go through the test charset's adapter."""

    charset: str
    n: int = 0
    correct: int = 0
    ned_sum: float = 0.0
    confidence_sum: float = 0.0
    length_sum: int = 0
    _adapter: CharsetAdapter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._adapter = CharsetAdapter(self.charset)

    def update(self, predictions: Sequence[str], labels: Sequence[str], confidences: Sequence[float]) -> list[bool]:
        """Add a batch; returns per-sample correctness."""
        hits = []
        for pred, label, conf in zip(predictions, labels, confidences, strict=True):
            pred, label = self._adapter(pred), self._adapter(label)
            hit = pred == label
            hits.append(hit)
            self.n += 1
            self.correct += hit
            # ICDAR 2019 normalised edit distance: by the longer of the two strings.
            self.ned_sum += edit_distance(pred, label) / max(len(pred), len(label), 1)
            self.confidence_sum += conf
            self.length_sum += len(label)
        return hits

    def merge(self, other: Scores) -> None:
        """Add another dataset's sums (for the sample-weighted Combined row)."""
        self.n += other.n
        self.correct += other.correct
        self.ned_sum += other.ned_sum
        self.confidence_sum += other.confidence_sum
        self.length_sum += other.length_sum

    @property
    def accuracy(self) -> float:
        """Word accuracy in percent."""
        return 100.0 * self.correct / max(self.n, 1)

    @property
    def one_minus_ned(self) -> float:
        """100 x (1 - mean normalised edit distance)."""
        return 100.0 * (1.0 - self.ned_sum / max(self.n, 1))

    @property
    def confidence(self) -> float:
        """Mean confidence in percent."""
        return 100.0 * self.confidence_sum / max(self.n, 1)

    @property
    def label_length(self) -> float:
        """Mean label length after the adapter."""
        return self.length_sum / max(self.n, 1)


LENGTH_BUCKETS = ((1, 3), (4, 6), (7, 9), (10, None))


def length_bucket(label: str) -> str:
    """The label-length bucket a label falls in: '1-3', '4-6', '7-9' or '10+'."""
    for low, high in LENGTH_BUCKETS:
        if high is None or len(label) <= high:
            return f"{low}-{high}" if high is not None else f"{low}+"
    raise AssertionError("unreachable")


def mcnemar_p(wins: int, losses: int) -> float:
    """One-sided exact McNemar p-value that a candidate is no better than a reference on the same crops: `wins`
    crops only the candidate reads right, `losses` only the reference; P(X >= wins), X ~ Binomial(wins +
    losses, 1/2)."""
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n
