"""PII: emails, phone numbers, payment cards (Luhn-checked) and Chinese national IDs (checksum-checked).

Per config the scanner redacts (the model sees a placeholder) or blocks the request.
"""

from __future__ import annotations

import re
from typing import Literal

from guardrails.scanners.base import Verdict

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
CN_ID = re.compile(r"(?<!\d)\d{17}[\dXx](?!\d)")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
# International (+country), Chinese mobile (1[3-9] + 9 digits) and North American shapes.
# International (+country), "(area) 123-4567", grouped national numbers and Chinese mobiles (1[3-9] + 9
# digits). Look-arounds keep a phone match from being carved out of a longer digit run such as a card.
_EDGE_L, _EDGE_R = r"(?<![\w+])(?<!\d[ .-])", r"(?![ .-]?\d)"
PHONE = re.compile(_EDGE_L + r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}"
                   r"|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4})" + _EDGE_R + r"|(?<!\d)1[3-9]\d{9}(?!\d)")

_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def cn_id_ok(value: str) -> bool:
    body, check = value[:17], value[17].upper()
    return _CN_CHECK[sum(int(c) * w for c, w in zip(body, _CN_WEIGHTS)) % 11] == check


class PII:
    name = "pii"

    def __init__(self, action: Literal["redact", "block"] = "redact"):
        self.action = action

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, kind) of each PII span, validated where a checksum exists."""
        spans: list[tuple[int, int, str]] = []

        def add(m, kind):
            if not any(s < m.end() and m.start() < e for s, e, _ in spans):
                spans.append((m.start(), m.end(), kind))

        for m in EMAIL.finditer(text):
            add(m, "email")
        for m in CN_ID.finditer(text):
            if cn_id_ok(m.group()):
                add(m, "cn_national_id")
        for m in CARD.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            international = m.start() > 0 and text[m.start() - 1] == "+"  # "+86 138...": a phone
            if 13 <= len(digits) <= 19 and luhn_ok(digits) and not international:
                add(m, "payment_card")
        for m in PHONE.finditer(text):
            if sum(c.isdigit() for c in m.group()) >= 7:
                add(m, "phone")
        return sorted(spans)

    def scan(self, text: str) -> Verdict:
        spans = self.find(text)
        if not spans:
            return Verdict(self.name, text, True, 0.0)
        kinds = sorted({k for _, _, k in spans})
        if self.action == "block":
            return Verdict(self.name, text, False, 1.0, f"contains {', '.join(kinds)}")
        out, last = [], 0
        for s, e, kind in spans:
            out.append(text[last:s] + f"[{kind.upper()}]")
            last = e
        out.append(text[last:])
        return Verdict(self.name, "".join(out), True, 1.0, f"redacted {', '.join(kinds)}")
