"""Vocabulary as in the seed: lowercase, split on non-word characters, minimum count,
and the four special tokens. It is saved inside the checkpoint; nothing rebuilds it."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "#PAD#", "#START#", "#END#", "#UNK#"
SPECIALS = (PAD, START, END, UNK)
_SPLIT = re.compile(r"\W+")


def tokenize(text: str) -> list[str]:
    return [w for w in _SPLIT.split(text.lower()) if w]


class Vocabulary:
    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate words")
        self.pad, self.start, self.end, self.unk = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted(w for w, n in counts.items() if n >= min_count and w not in SPECIALS)
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str) -> list[int]:
        """START w1 .. wn END."""
        return [self.start] + [self.stoi.get(w, self.unk) for w in tokenize(caption)] + [self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first END, specials dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.pad, self.start):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    def to_list(self) -> list[str]:
        return list(self.itos)
