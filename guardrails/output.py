"""The last check on a reply before it leaves: PII is redacted and a system-prompt leak stops the reply.

Works on a whole reply or on a stream. A stream is held back a little, so neither a PII value nor a
verbatim run of a protected text (a system prompt, a canary) is released before it is complete:
- PII: the last `HOLD` characters stay back, and never a cut through a match;
- leaks: text that has started to repeat a protected text word for word stays back until it either
  parts from it (released) or repeats `min_chars` characters of it (the filter trips: nothing more
  goes out, and the caller replaces or ends the reply).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guardrails import linear
from guardrails.scanners.pii import PII

HOLD = 64  # longer than any card, phone or national-ID value with its separators
NGRAM = 3  # words a run must share with a protected text before it is held back
# A word (letters and digits), or one CJK character: Chinese and Japanese have no spaces, so a character
# is their word.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
_TOKEN = linear.compile(f"[{_CJK}]|(?:[^\\P{{L}}{_CJK}]|\\p{{N}})+")


def _tokens(text: str, offset: int = 0) -> list[tuple[str, int, int]]:
    return [(m.group().lower(), m.start() + offset, m.end() + offset) for m in _TOKEN.finditer(text)]


@dataclass
class LeakIndex:
    """The word n-grams of the texts a reply must not repeat."""
    min_chars: int
    grams: set[tuple[str, ...]] = field(default_factory=set)
    markers: list[str] = field(default_factory=list)  # canaries: one occurrence is a leak

    @classmethod
    def of(cls, protected: list[str], min_chars: int) -> LeakIndex:
        index = cls(min_chars)
        for text in protected:
            words = [t for t, _, _ in _tokens(text)]
            index.grams.update(tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1))
        return index

    def runs(self, text: str, offset: int) -> list[tuple[int, int, bool]]:
        """(start, end, open) character spans of `text` that repeat a protected text, as runs of shared
        n-grams; `open`: the run reaches the text's last word, so it may go on."""
        if not self.grams or self.min_chars <= 0:
            return []
        toks, runs, start = _tokens(text, offset), [], None
        last = len(toks) - NGRAM
        for i in range(last + 1):
            if tuple(t for t, _, _ in toks[i:i + NGRAM]) in self.grams:
                start = toks[i][1] if start is None else start
                if runs and runs[-1][0] == start:
                    runs.pop()
                runs.append((start, toks[i + NGRAM - 1][2], i == last))
            else:
                start = None
        return runs

    def leak(self, text: str, runs: list[tuple[int, int, bool]]) -> str | None:
        """Why `text`, whose runs are `runs`, leaks: a canary in it, or a run of `min_chars` or more."""
        if any(m.lower() in text.lower() for m in self.markers):
            return "carries the system prompt's canary"
        long = next((end - start for start, end, _ in runs if end - start >= self.min_chars), None)
        return None if long is None else f"repeats {long} characters of a system prompt"


class OutputFilter:
    """feed() pieces as they come, then finish(); each returns the text that may be sent now."""

    def __init__(self, pii: PII | None, leaks: LeakIndex | None):
        self.pii, self.leaks = pii, leaks
        self.raw = ""
        self.sent_upto = 0  # characters of `raw` already released
        self.tripped: str | None = None  # why the reply was stopped
        self.redacted: set[str] = set()

    def feed(self, piece: str) -> str:
        if self.tripped:
            return ""
        self.raw += piece
        return self._release(final=False)

    def finish(self) -> str:
        return "" if self.tripped else self._release(final=True)

    def _release(self, *, final: bool) -> str:
        # Look back far enough for a match that began before the last release (and for PII context).
        base = max(0, self.sent_upto - HOLD - (self.leaks.min_chars if self.leaks else 0))
        window = self.raw[base:]
        cut = len(self.raw) if final else max(self.sent_upto, len(self.raw) - HOLD)
        if self.leaks is not None:
            runs = self.leaks.runs(window, base)
            if (why := self.leaks.leak(window, runs)) is not None:
                self.tripped = why
                return ""
            for start, _, still_open in runs:
                if not final and still_open and start < cut:
                    cut = max(self.sent_upto, start)  # still repeating: hold it until it parts or trips
        spans = self.pii.find(window) if self.pii is not None else []
        spans = [(s + base, e + base, k) for s, e, k in spans if e + base > self.sent_upto]
        for s, e, _ in spans:
            if s < cut < e:
                cut = max(self.sent_upto, s)
        return self._emit(cut, spans)

    def _emit(self, cut: int, spans: list[tuple[int, int, str]]) -> str:
        out, pos = [], self.sent_upto
        for s, e, kind in spans:
            if e > cut:
                break
            out.append(self.raw[pos:max(pos, s)] + f"[{kind.upper()}]")
            self.redacted.add(kind)
            pos = max(pos, e)
        out.append(self.raw[pos:cut] if cut > pos else "")
        self.sent_upto = max(self.sent_upto, cut)
        return "".join(out)

    def trip_on(self, text: str) -> bool:
        """Trip on a leak in `text`, another reading of the reply (a data reply's strings, unescaped):
        a canary, or `min_chars` repeated from a protected text. True when tripped."""
        if self.leaks is not None and not self.tripped:
            self.tripped = self.leaks.leak(text, self.leaks.runs(text, 0))
        return self.tripped is not None

    def whole(self, text: str) -> str:
        """A whole reply at once: what may go out ("" when tripped)."""
        return self.feed(text) + self.finish()
