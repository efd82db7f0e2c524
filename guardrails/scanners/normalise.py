"""Unicode NFKC plus removal of zero-width and control characters, so obfuscated text reads as it looks."""

from __future__ import annotations

import re
import unicodedata

from guardrails.scanners.base import Verdict

# Zero-width and bidi marks, soft hyphen, and C0/C1 controls except tab and newline.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Normalise:
    name = "normalise"

    def scan(self, text: str) -> Verdict:
        clean = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
        changed = clean != text
        return Verdict(self.name, clean, True, 0.0, "normalised" if changed else "")
