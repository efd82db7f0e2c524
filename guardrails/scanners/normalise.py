"""Unicode NFKC plus removal of zero-width and control characters, so obfuscated text reads as it looks."""

from __future__ import annotations

import unicodedata

from guardrails.scanners.base import Verdict

# Zero-width and bidi marks, soft hyphen, and C0/C1 controls except tab and newline: deleted with
# str.translate, one table look-up per character (no pattern to backtrack).
_INVISIBLE = dict.fromkeys([0xAD, 0x180E, *range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2065),
                            0xFEFF, *range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)])
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
        visible = text.translate(_INVISIBLE)  # never longer than `text`
        if len(visible) > _MAX_SHRINK * self.max_chars:
            return Verdict(self.name, visible, True, 0.0, "too long for NFKC: invisible characters removed")
        clean = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
        changed = clean != text
        return Verdict(self.name, clean, True, 0.0, "normalised" if changed else "")
