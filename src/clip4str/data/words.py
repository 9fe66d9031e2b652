"""Labels for synthetic words: dictionary words in several casings, numbers, punctuated words, random strings,
and the brand names, codes and long compounds of shop signs and street scenes."""

from __future__ import annotations

import gzip
import string
from importlib import resources

import numpy as np

from clip4str.charset import CHARSETS

PUNCT_WRAP = ['"{}"', "({})", "{}.", "{},", "{}!", "{}?", "{}:", "#{}", "{}'s", "${}", "{}%", "-{}-", "{}&"]


def _load_words() -> list[str]:
    data = resources.files("clip4str.data").joinpath("resources/words.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8").split()


class WordSampler:
    """Dictionary words (in several casings), random strings, numbers and punctuated words, as the charset allows."""

    def __init__(self, charset: str = CHARSETS["94"], max_length: int = 25) -> None:
        self.charset, self.max_length = charset, max_length
        allowed = set(charset)
        words = []
        for w in _load_words():
            if len(w) > max_length:
                continue
            for form in (w, w.lower(), w.upper(), w.capitalize()):
                if set(form) <= allowed:
                    words.append(form)
                    break
        self.words = words
        lengths = np.array([len(w) for w in words], dtype=np.int64)
        self._shortest_first = np.argsort(lengths, kind="stable")  # for length-capped draws
        self._count_up_to = np.searchsorted(lengths[self._shortest_first], np.arange(max_length + 1), side="right")
        self.digits = "".join(c for c in string.digits if c in allowed)
        self.symbols = "".join(c for c in charset if not c.isalnum() and not c.isspace())
        self.upper_ok = any(c.isupper() for c in charset)
        self.lower_ok = any(c.islower() for c in charset)

    def _case(self, word: str, rng: np.random.Generator) -> str:
        r = rng.random()
        if r < 0.45 or not self.lower_ok:
            form = word.upper() if r > 0.3 or not self.lower_ok else word
        elif r < 0.8:
            form = word.lower()
        else:
            form = word.capitalize()
        return form if set(form) <= set(self.charset) else word

    def _word(self, rng: np.random.Generator, cap: int) -> str:
        if cap >= self.max_length:
            return self.words[rng.integers(len(self.words))]
        count = int(self._count_up_to[max(cap, 1)]) or 1  # words of at most `cap` characters
        return self.words[self._shortest_first[rng.integers(count)]]

    def _compound(self, rng: np.random.Generator, cap: int) -> str:
        """Two words run together, as brand names and signs write them (StarBucks, HOLIDAYINN, firestone):
        longer labels and fewer dictionary words than plain words give."""
        if cap < 4:
            return ""
        first = self._word(rng, max(2, cap // 2))
        second = self._word(rng, max(2, cap - len(first)))
        style = rng.random()
        text = first.capitalize() + second.capitalize() if style < 0.5 else \
            (first + second).upper() if style < 0.8 else (first + second).lower()
        return text if len(text) <= cap and set(text) <= set(self.charset) else ""

    def _code(self, rng: np.random.Generator, cap: int) -> str:
        """Letters and digits mixed, as model numbers, plates and product codes are (LCD2470WVX, A4, M25)."""
        letters = [c for c in string.ascii_uppercase if c in self.charset] or \
            [c for c in string.ascii_lowercase if c in self.charset]
        if not letters:
            return ""
        if cap < 2:
            return ""
        n = int(rng.integers(2, min(11, cap + 1)))
        chars = [rng.choice(letters if rng.random() < 0.5 else list(self.digits)) for _ in range(n)]
        chars[int(rng.integers(n))] = rng.choice(letters)  # at least one of each, at random places
        spot = next(i for i in rng.permutation(n) if chars[i] not in letters or n == 1 or
                    sum(c in letters for c in chars) > 1)
        chars[spot] = rng.choice(list(self.digits))
        return "".join(chars)

    def __call__(self, rng: np.random.Generator, max_chars: int | None = None) -> str:
        """One label of at most `max_chars` (default: max_length) characters; never empty, all in the charset."""
        cap = self.max_length if max_chars is None else max(1, min(max_chars, self.max_length))
        r = rng.random()
        text = ""
        if self.words and r < 0.52:
            text = self._case(self._word(rng, cap), rng)
        elif self.words and r < 0.60:
            text = self._compound(rng, cap)
        elif self.digits and r < 0.66:
            text = self._code(rng, cap)
        elif self.digits and r < 0.76:
            n = int(rng.integers(1, min(9, cap + 1)))
            text = "".join(rng.choice(list(self.digits), n))
            if self.symbols and rng.random() < 0.4:
                sep = rng.choice([s for s in ".,:-/" if s in self.symbols] or list(self.symbols))
                text = text[: max(1, n // 2)] + sep + text[max(1, n // 2):]
        elif self.words and self.symbols and r < 0.84:
            pattern = PUNCT_WRAP[rng.integers(len(PUNCT_WRAP))]
            candidate = pattern.format(self._case(self._word(rng, cap - 2), rng))
            text = candidate if set(candidate) <= set(self.charset) else ""
        if not text:
            n = int(rng.integers(1, min(13, cap + 1)))
            pool = [c for c in self.charset if not c.isspace()]
            if self.symbols and rng.random() < 0.7:  # mostly letters and digits, as in real scenes
                pool = [c for c in pool if c.isalnum()] or pool
            text = "".join(rng.choice(pool, n))
        return text[:cap]


