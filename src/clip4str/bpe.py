"""CLIP's byte-pair tokenizer without PyTorch (the ONNX backend needs it; open_clip's imports torch).

Same vocabulary file and rules as open_clip's `SimpleTokenizer` (its tests compare the two).
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import ftfy
import numpy as np
import regex

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<start_of_text>", "<end_of_text>"
MAX_VOCAB_BYTES = 4 << 20  # CLIP's vocabulary inflates to 3.2 MB; the merges read are its first 0.5 MB


@functools.lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, codes), strict=True))


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class BPETokenizer:
    """Text -> CLIP token ids, padded to `context_length`, truncated with EOT kept last."""

    def __init__(self, vocab_path: str | Path) -> None:
        with gzip.open(vocab_path) as f:  # a bound whatever the file inflates to (a gzip bomb beside an export)
            merges = f.read(MAX_VOCAB_BYTES).decode("utf-8", errors="replace").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(_bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self.pattern = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (without SOT/EOT)."""
        ids = []
        byte_encoder = _bytes_to_unicode()
        for token in regex.findall(self.pattern, _clean(text)):
            token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token))
        return ids

    def __call__(self, texts: list[str], context_length: int) -> np.ndarray:
        """(N, context_length) int64: SOT ids EOT, zero padded; too long -> cut with EOT last."""
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot][:context_length]
            ids[-1] = self.eot
            out[i, : len(ids)] = ids
        return out
