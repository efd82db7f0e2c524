"""Text as it looks: Unicode NFKC, and zero-width, bidi, soft-hyphen and control characters removed.

The normalise scanner applies it before every other scanner; the classifier applies it to what it
reads as well, so it is trained, calibrated and measured on the text serving shows it.
"""

from __future__ import annotations

import unicodedata

# Zero-width and bidi marks, soft hyphen, and C0/C1 controls except tab and newline: deleted with
# str.translate, one table look-up per character (no pattern to backtrack).
INVISIBLE = dict.fromkeys([0xAD, 0x180E, *range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2065),
                           0xFEFF, *range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)])


def without_invisible(text: str) -> str:
    return text.translate(INVISIBLE)


def visible(text: str) -> str:
    """NFKC, then the invisible characters removed. NFKC can grow a text 18-fold ('\\ufdfa'): callers
    bound the length first."""
    return unicodedata.normalize("NFKC", text).translate(INVISIBLE)
