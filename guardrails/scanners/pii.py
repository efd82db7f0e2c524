"""PII: emails, phone numbers, payment cards (Luhn-checked) and Chinese national IDs (checksum-checked).

Per config the scanner redacts (the model sees a placeholder) or blocks the request.

The patterns run on RE2 (linear time, see linear.py), which has no look-arounds. What the look-arounds
did is kept, with the same matches: a look-ahead became a character the pattern reads after the
match (outside the captured span), and a look-behind a check in Python on RE2's candidate, resuming
one character further on when it fails, as a backtracking engine would.
"""

from __future__ import annotations

from operator import mul
from typing import Literal

from guardrails import linear
from guardrails.scanners.base import Verdict

EMAIL = linear.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# Whole digit runs of 17 or more (and a trailing X): an ID is a run of 18 digits, or of 17 and an X.
CN_ID = linear.compile(r"\d{17,}[Xx]?")
# Whole chains of 13 or more digits, at most one space or hyphen between two: cards are cut from a
# chain at its separators (_cards).
CARD = linear.compile(r"\d(?:[ -]?\d){12,}")
# International (+country), "(area) 123-4567", grouped national numbers, then Chinese mobiles
# (1[3-9] + 9 digits). Group 1 or 2 is the number; what follows it is read, not kept: no digit, and no
# separator then a digit, so a phone is never carved out of a longer digit run such as a card.
_MOBILE = r"(1[3-9]\d{9})(?:\z|\D)"
PHONE = linear.compile(r"((?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}|\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}))"
                       r"(?:\z|[^\d .-]|[ .-](?:\z|\D))|" + _MOBILE)
MOBILE = linear.compile(_MOBILE)  # anchored where PHONE's first shape fails its look-behind
_MOBILE_HEADS = tuple(b"1%d" % d for d in range(3, 10))
DIGIT_RUN = linear.compile(r"\d+")  # no phone starts inside a run of digits: both look-behinds refuse it
PATTERNS = (EMAIL, CN_ID, CARD, PHONE, MOBILE, DIGIT_RUN)

_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"
_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # a doubled digit, its two digits summed


def luhn_ok(digits: str) -> bool:
    total = sum(map(int, digits[-1::-2])) + sum(map(_LUHN_DOUBLED.__getitem__, map(int, digits[-2::-2])))
    return total % 10 == 0


def cn_id_ok(value: str) -> bool:
    body, check = value[:17], value[17].upper()
    return _CN_CHECK[sum(map(mul, map(int, body), _CN_WEIGHTS)) % 11] == check


def _emails(data: bytes):
    for m in EMAIL.finditer(data):
        yield m.span()


def _cn_ids(data: bytes):
    for m in CN_ID.finditer(data):
        run = linear.decode(m.group())
        digits = len(run) - (run[-1] in "Xx")
        if digits == 18:  # (?<!\d)\d{18}(?!\d): the run is whole, so nothing to look at
            value = run[:18]
        elif digits == 17 and run[-1] in "Xx" and not linear.char_at(data, m.end()).isdecimal():
            value = run
        else:
            continue
        if cn_id_ok(value):
            yield m.start(), m.start() + len(linear.utf8(value))


def _cards(data: bytes):
    """The old (?<!\\d)(?:\\d[ -]?){12,18}\\d(?!\\d) on one chain: it starts at a group of digits and
    ends at the end of one, taking the most digits up to 19 (13 at least); where no end fits, it
    starts again at the next group."""
    for m in CARD.finditer(data):
        chain = m.group()
        if chain.isdigit():  # ASCII digits only, no separator: one group, a card if 13 to 19 long
            if len(chain) <= 19 and linear.char_before(data, m.start())[0] != "+" and luhn_ok(chain.decode()):
                yield m.span()
            continue
        parts = chain.replace(b"-", b" ").split(b" ")
        sizes = [len(p) for p in parts] if chain.isascii() else [len(linear.decode(p)) for p in parts]
        starts, at = [], m.start()
        for p in parts:
            starts.append(at)
            at += len(p) + 1
        international = linear.char_before(data, m.start())[0] == "+"  # "+86 138...": a phone
        i, n = 0, len(parts)
        while i < n:
            total, best = 0, -1
            for j in range(i, n):
                total += sizes[j]
                if total > 19:
                    break
                if total >= 13:
                    best = j
            if best < 0:
                i += 1
                continue
            digits = linear.decode(b"".join(parts[i:best + 1]))
            if not (i == 0 and international) and luhn_ok(digits):
                yield starts[i], starts[best] + len(parts[best])
            i = best + 1


def _phone_edge_ok(data: bytes, at: int) -> bool:
    """The old (?<![\\w+])(?<!\\d[ .-]) at byte `at`."""
    c1, before = linear.char_before(data, at)
    if c1.isalnum() or c1 in ("_", "+"):
        return False
    return not (c1 and c1 in " .-" and linear.char_before(data, before)[0].isdecimal())


def _after_digit(data: bytes, at: int) -> bool:
    return linear.char_before(data, at)[0].isdecimal()


def _past_digit_run(data: bytes, at: int) -> int:
    """Where a backtracking engine could next start a phone after failing at `at`: the old look-behinds
    refuse every start inside a run of digits and just after it."""
    head = data[at:at + 64]
    end = at + len(head) - len(head.lstrip(b"0123456789"))
    if end == at + 64 or (end < len(data) and data[end] >= 0x80):  # long, or maybe a non-ASCII digit next
        run = DIGIT_RUN.match(data, at)
        end = run.end() if run else at
    return linear.next_char(data, end)


def _phones(data: bytes):
    pos = 0
    while (m := PHONE.search(data, pos)) is not None:
        (at, _), first, span = m.span(), m.span(1), None
        if first[0] == at:  # the first shape; where its look-behind fails, the mobile one may still fit
            if _phone_edge_ok(data, at):
                span = first
            elif data.startswith(_MOBILE_HEADS, at) and not _after_digit(data, at):
                mobile = MOBILE.match(data, at)
                span = mobile.span(1) if mobile else None
        elif not _after_digit(data, at):  # the mobile shape's (?<!\\d)
            span = m.span(2)
        if span is None:
            pos = _past_digit_run(data, at)
            continue
        yield span  # every shape has 8 digits or more, so no count is needed
        pos = span[1]


def _merge(taken: list[tuple[int, int, str]], found, kind: str) -> list[tuple[int, int, str]]:
    """`taken` (sorted, disjoint) plus each span of `found` (in order, disjoint) that overlaps none of it."""
    new, i = [], 0
    for s, e in found:
        while i < len(taken) and taken[i][1] <= s:
            i += 1
        if i == len(taken) or e <= taken[i][0]:
            new.append((s, e, kind))
    return sorted(taken + new) if new else taken


class PII:
    name = "pii"

    def __init__(self, action: Literal["redact", "block"] = "redact"):
        self.action = action

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, kind) character spans of PII, validated where a checksum exists; an earlier kind
        wins an overlap (email, then national ID, card, phone)."""
        data = linear.utf8(text)
        spans: list[tuple[int, int, str]] = []
        for kind, found in (("email", _emails), ("cn_national_id", _cn_ids), ("payment_card", _cards),
                            ("phone", _phones)):
            spans = _merge(spans, found(data), kind)
        if len(data) == len(text) or not spans:  # ASCII: bytes are characters
            return spans
        chars = linear.char_offsets(data, [x for s, e, _ in spans for x in (s, e)])
        return [(chars[s], chars[e], kind) for s, e, kind in spans]

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
