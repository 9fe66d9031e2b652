"""Charsets, label normalization and the PARSeq-order tokenizer."""

from __future__ import annotations

import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

DIGITS_LOWER = string.digits + string.ascii_lowercase
CHARSETS: dict[str, str] = {
    "36": DIGITS_LOWER,
    "62": DIGITS_LOWER + string.ascii_uppercase,
    "94": DIGITS_LOWER + string.ascii_uppercase + string.punctuation,
}
EOS, BOS, PAD = "[E]", "[B]", "[P]"


def resolve_charset(spec: str) -> str:
    """Return the characters named by '36' | '62' | '94', a path to a UTF-8 file, or a literal string."""
    if spec in CHARSETS:
        return CHARSETS[spec]
    path = Path(spec)
    if len(spec) < 4096 and "\n" not in spec and path.suffix in {".txt", ".charset"}:
        if not path.is_file():
            raise FileNotFoundError(f"charset file {spec!r} does not exist; give '36', '62', '94' or a string")
        # One file may list characters on one line or one per line; newlines are separators, not characters.
        spec = "".join(path.read_text(encoding="utf-8").splitlines())
    validate_charset(spec)
    return spec


def validate_charset(chars: str) -> None:
    """Raise ValueError if a charset is empty or repeats a character."""
    if not chars:
        raise ValueError("charset is empty: give '36', '62', '94', a string of characters or a .txt file")
    repeated = [c for c, n in Counter(chars).items() if n > 1]
    if repeated:
        raise ValueError(f"charset repeats characters {''.join(repeated)!r}; list each character once")
    if any(c in "\r\n" for c in chars):
        raise ValueError("charset contains a newline; newlines cannot be recognized")


class CharsetAdapter:
    """Map a string onto a target charset: fold case the charset lacks, drop what it cannot represent."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._allowed = frozenset(target)
        self.lowercase_only = target == target.lower()
        self.uppercase_only = not self.lowercase_only and target == target.upper()
        self.dropped: Counter[str] = Counter()

    def fold_case(self, text: str) -> str:
        """The text in the charset's case, where it has only one."""
        return text.lower() if self.lowercase_only else text.upper() if self.uppercase_only else text

    def __call__(self, text: str) -> str:
        text = self.fold_case(text)
        kept = []
        for c in text:
            if c in self._allowed:
                kept.append(c)
            else:
                self.dropped[c] += 1
        return "".join(kept)


@dataclass
class LabelFilterStats:
    """Counts of labels kept and dropped by `LabelNormalizer`, with the reason."""

    kept: int = 0
    too_long: int = 0
    empty: int = 0
    changed: int = 0  # kept with characters outside the charset dropped or folded to ASCII
    examples: list[tuple[str, str]] = field(default_factory=list)  # a few (label, as kept) of those

    def summary(self) -> str:
        """One line saying what was kept, changed and dropped."""
        changed = ""
        if self.changed:
            shown = ", ".join(f"{a!r} -> {b!r}" for a, b in self.examples)
            changed = f" ({self.changed} with characters outside the charset dropped or folded to ASCII, e.g. {shown})"
        return (f"kept {self.kept}{changed}, dropped {self.too_long} longer than the limit, {self.empty} empty after "
                "filtering")


class LabelNormalizer:
    """The reference label rules in order: whitespace removal, NFKD to ASCII, length limit, charset adapter."""

    def __init__(self, charset: str, max_length: int = 25, remove_whitespace: bool | None = None,
                 unicode_to_ascii: bool | None = None) -> None:
        # A charset with a space means the user reads multi-word lines: keep (single) spaces then.
        self.remove_whitespace = (" " not in charset) if remove_whitespace is None else remove_whitespace
        self.unicode_to_ascii = charset.isascii() if unicode_to_ascii is None else unicode_to_ascii
        self.max_length = max_length
        self.adapter = CharsetAdapter(charset)
        self.stats = LabelFilterStats()

    def __call__(self, label: str) -> str | None:
        """Return the normalized label, or None when the reference rules drop it."""
        label = "".join(label.split()) if self.remove_whitespace else " ".join(label.split())
        spaced, unmapped = label, ""
        if self.unicode_to_ascii and not label.isascii():
            label = unicodedata.normalize("NFKD", label)
            # Accents fall off as combining marks; other characters without an ASCII form are dropped.
            unmapped = "".join(c for c in label if not c.isascii() and not unicodedata.combining(c))
            label = label.encode("ascii", "ignore").decode()
        if len(label) > self.max_length:
            self.stats.too_long += 1
            return None
        label = self.adapter(label)
        self.adapter.dropped.update(unmapped)  # as the adapter counts what it drops: labels within the length limit
        if not label:
            self.stats.empty += 1
            return None
        self.stats.kept += 1
        # Whitespace and a single-case charset's case folding are its documented rules; anything else is news.
        if label != self.adapter.fold_case(spaced):
            self.stats.changed += 1
            if len(self.stats.examples) < 3:
                self.stats.examples.append((spaced, label))
        return label


@dataclass
class DecodedText:
    """One decoded sequence: text, confidence (product of probabilities incl. EOS), per-character probs."""

    text: str
    confidence: float
    char_probs: list[float]


class Tokenizer:
    """PARSeq token order: [E]=0, characters 1..K, [B]=K+1, [P]=K+2; the head predicts ids 0..K."""

    def __init__(self, charset: str) -> None:
        validate_charset(charset)
        self.charset = charset
        self.itos: tuple[str, ...] = (EOS, *charset, BOS, PAD)
        self._stoi = {c: i for i, c in enumerate(charset, start=1)}
        self.eos_id, self.bos_id, self.pad_id = 0, len(charset) + 1, len(charset) + 2
        self.dropped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def num_classes(self) -> int:
        """Size of the prediction head: EOS plus every character."""
        return len(self.charset) + 1

    def encode_ids(self, text: str) -> list[int]:
        """Character ids of a string; characters outside the charset are dropped and counted."""
        ids = []
        for c in text:
            i = self._stoi.get(c)
            if i is None:
                self.dropped[c] += 1
            else:
                ids.append(i)
        return ids

    def encode(self, labels: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Batch of labels -> LongTensor (B, max_len + 2): [B] ids [E] then [P] padding."""
        import torch

        if isinstance(labels, str):
            raise TypeError("encode() takes a list of labels, not a single string")
        rows = [[self.bos_id, *self.encode_ids(t), self.eos_id] for t in labels]
        width = max((len(r) for r in rows), default=2)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(device) if device is not None else out

    def ids_to_text(self, ids: Sequence[int]) -> str:
        """Characters for ids, stopping at the first EOS."""
        chars = []
        for i in ids:
            if i == self.eos_id:
                break
            chars.append(self.itos[i])
        return "".join(chars)

    def captions(self, ids: Sequence[Sequence[int]], lengths: Sequence[int] | None,
                 adapter: CharsetAdapter) -> list[str]:
        """Greedy id rows (cut to `lengths`, then at EOS) -> strings in the adapter's charset."""
        rows = ids if lengths is None else [row[:n] for row, n in zip(ids, lengths, strict=True)]
        return [adapter(self.ids_to_text(row)) for row in rows]

    def decode(self, probs: Any, lengths: Sequence[int] | None = None) -> list[DecodedText]:
        """(B, L, C) probabilities (torch or NumPy) -> greedy text cut at the first EOS, per-character probs.

        `lengths` limits how many positions of each row are valid (rows decoded for fewer steps).
        """
        probs = np.asarray(probs.float().cpu() if hasattr(probs, "float") and not isinstance(probs, np.ndarray)
                           else probs, dtype=np.float64)
        if probs.ndim != 3:
            raise ValueError(f"decode() expects probabilities of shape (B, L, C), got {probs.shape}")
        top_p, top_i = probs.max(-1), probs.argmax(-1)
        out = []
        for row in range(len(probs)):
            n = probs.shape[1] if lengths is None else int(lengths[row])
            p, ids = top_p[row, :n].tolist(), top_i[row, :n].tolist()
            end = ids.index(self.eos_id) if self.eos_id in ids else len(ids)
            text = "".join(self.itos[i] for i in ids[:end])
            char_probs = p[: end + 1]  # EOS probability belongs to the confidence
            out.append(DecodedText(text, float(np.prod(char_probs)) if char_probs else 0.0, char_probs))
        return out


def caption_updates(passes: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """Captions of successive passes over the same rows -> (the captions the text encoder must read, in one batch;
    for each pass, the rows they belong to): every row of the first pass, then only the rows a pass changed."""
    rows = [list(range(len(passes[0])))] if passes else []
    for old, new in pairwise(passes):
        rows.append([i for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b])
    return [passes[k][i] for k, ids in enumerate(rows) for i in ids], rows


def pass_memories(first: Any, text: Any, rows: list[list[int]], width: int, copy: Callable[[Any], Any]) -> list:
    """One cross memory per caption pass (either backend's arrays), from the first pass's and `caption_updates`'
    rows: each later pass copies the one before and writes its changed rows' text features (from `text`, after
    the first pass's rows) after the `width` image tokens; a pass that changed nothing gets the same object."""
    memories, start = [first], len(rows[0])
    for changed in rows[1:]:
        memory = memories[-1]
        if changed:
            memory = copy(memory)
            memory[changed, width:] = text[start:start + len(changed)]
            start += len(changed)
        memories.append(memory)
    return memories
