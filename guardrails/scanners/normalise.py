"""Unicode NFKC plus removal of zero-width and control characters, so obfuscated text reads as it looks."""

from __future__ import annotations

from guardrails.scanners.base import Verdict
from guardrails.visible import visible, without_invisible

# NFKC composes at most 4 characters into one (U+1FAF from its decomposition), so a text longer than
# 4x the size limit stays over it after NFKC too.
_MAX_SHRINK = 4


class Normalise:
    """`max_chars`: the size limit the text meets next. NFKC can grow a text 18-fold ('\\ufdfa'), so a text
    the size check refuses whatever NFKC makes of it only loses its invisible characters."""

    name = "normalise"

    def __init__(self, max_chars: int = 4000):
        self.max_chars = max_chars

    def scan(self, text: str) -> Verdict:
        shown = without_invisible(text)  # never longer than `text`
        if len(shown) > _MAX_SHRINK * self.max_chars:
            return Verdict(self.name, shown, True, 0.0, "too long for NFKC: invisible characters removed")
        clean = visible(text)
        changed = clean != text
        return Verdict(self.name, clean, True, 0.0, "normalised" if changed else "")
