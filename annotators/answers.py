"""Free-text answers -> class indices (coreg-method.md §2.2): exact, normalised, unique substring, closest.

Each step is tried only when the one before found nothing, and an answer that still maps to nothing returns
None: the caller counts it and adds no vote; nothing is guessed silently. Two different classes named in
one answer ("a cat or a dog") are ambiguous and also give None rather than a closest-name guess.
"""

from __future__ import annotations

import difflib
import re
import unicodedata

CLOSEST_CUTOFF = 0.75  # difflib ratio: accepts typos ("airplan" -> "airplane"), rejects unrelated words


def normalise(text: str) -> str:
    """Lower case, `_` and punctuation to spaces, accents folded, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[_\W]+", " ", text.lower())
    return " ".join(text.split())


class AnswerMapper:
    """Maps answers to indices of `classes`; `method` of the last call says which step matched."""

    def __init__(self, classes: list[str]):
        self.classes = list(classes)
        self.norm = [normalise(c) for c in classes]
        # a class name as a whole word or phrase, plural 's'/'es' allowed: "cats" names "cat", "category" does not
        self.patterns = [re.compile(rf"\b{re.escape(n)}(?:e?s)?\b") for n in self.norm]

    def __call__(self, answer: str) -> tuple[int | None, str]:
        text = answer.strip()
        if text in self.classes:
            return self.classes.index(text), "exact"
        norm = normalise(text)
        if not norm:
            return None, "empty"
        if norm in self.norm:
            return self.norm.index(norm), "normalised"
        named = [i for i, p in enumerate(self.patterns) if p.search(norm)]
        # "pickup truck" also contains "truck": a name inside another named one does not count twice
        named = [i for i in named if not any(j != i and self.norm[i] in self.norm[j] for j in named)]
        if len(named) == 1:
            return named[0], "substring"
        if len(named) > 1:
            return None, "ambiguous"
        within = [i for i, n in enumerate(self.norm) if len(norm) >= 3 and re.search(rf"\b{re.escape(norm)}\b", n)]
        if len(within) == 1:  # "fish" for "aquarium fish"
            return within[0], "substring"
        if len(within) > 1:
            return None, "ambiguous"
        close = difflib.get_close_matches(norm, self.norm, n=2, cutoff=CLOSEST_CUTOFF)
        if close and (len(close) == 1 or difflib.SequenceMatcher(None, norm, close[0]).ratio() > difflib.SequenceMatcher(None, norm, close[1]).ratio()):
            return self.norm.index(close[0]), "closest"
        return None, "unmatched"
