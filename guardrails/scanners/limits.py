"""Size and charset limits: very long inputs and inputs made mostly of unusual code points are refused."""

from __future__ import annotations

import unicodedata

from guardrails.scanners.base import Verdict


class SizeCharset:
    name = "size_charset"

    def __init__(self, max_chars: int = 4000, max_symbol_ratio: float = 0.5):
        self.max_chars, self.max_symbol_ratio = max_chars, max_symbol_ratio

    def scan(self, text: str) -> Verdict:
        if len(text) > self.max_chars:
            return Verdict(self.name, text, False, 1.0, f"input is {len(text)} characters; the limit is {self.max_chars}")
        visible = [c for c in text if not c.isspace()]
        if visible:
            odd = sum(1 for c in visible if unicodedata.category(c)[0] in "SCM")  # symbols, controls, marks
            ratio = odd / len(visible)
            if ratio > self.max_symbol_ratio and len(visible) >= 20:
                return Verdict(self.name, text, False, ratio, f"{ratio:.0%} of the input is symbols or marks")
        return Verdict(self.name, text, True, 0.0)
