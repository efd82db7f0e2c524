"""Linear-time patterns for the scanners, the output filter and the classifier's view: every pattern
compiles on RE2 (google-re2), never on `re`.

Python's `re` backtracks, so one hostile request could cost the square of its length (the e-mail
pattern took seconds on 60,000 'a's). RE2 runs in time linear in the input whatever the pattern and
the input are. It has no look-arounds: scanners that need a boundary check do it in Python on RE2's
candidates (see scanners/pii.py).

Texts go to RE2 as UTF-8 bytes, encoded once per scan: the bytes API resumes a search at any offset
in constant time (the str API re-encodes and re-counts the whole text on every call with a `pos`).
RE2 reads the pattern and the text as UTF-8, so `.` and `{m,n}` count code points and `(?i)` folds
Unicode case.
"""

from __future__ import annotations

import re2

Regexp = type(re2.compile(""))  # the compiled-pattern type every scanner pattern has (tests/test_scanner_bounds.py)

# RE2's default memory per pattern, stated: it bounds each pattern's DFA cache. On text crafted to
# thrash the cache (dense keywords inside the `.{0,12}` gaps) RE2 falls back to its NFA, still linear
# (about 0.3 s per MB for the worst pattern here); 4x the memory was measured no faster.
MAX_MEM = 8 << 20

# Python's `\d`, `\s` and `\w` on str are Unicode; RE2's are ASCII. compile() writes these in their place
# (checked code point by code point in tests/test_scanner_bounds.py). RE2's `\b` stays ASCII: next to
# an ASCII letter of a keyword it holds wherever Python's does, and a little more often.
_PY_CLASSES = {"d": r"\p{Nd}", "s": r"\s\x0b\x1c-\x1f\x85\p{Z}", "w": r"\p{L}\p{N}_"}


def python_classes(pattern: str) -> str:
    r"""`pattern` with Python's Unicode `\d \s \w` (and `\D \S \W` outside brackets) spelled out for RE2."""
    out, i, bracket = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            esc = pattern[i + 1]
            body = _PY_CLASSES.get(esc.lower())
            if body is None:
                out.append(c + esc)
            elif bracket and esc.isupper():
                raise ValueError(f"\\{esc} inside [...] has no RE2 spelling: {pattern!r}")
            else:
                out.append(body if bracket else f"[{'^' if esc.isupper() else ''}{body}]")
            i += 2
            continue
        bracket = (bracket or c == "[") and not (bracket and c == "]")
        out.append(c)
        i += 1
    return "".join(out)


def compile(pattern: str, *, ignore_case: bool = False) -> Regexp:  # noqa: A001 - re's name, RE2's engine
    """RE2-compiled `pattern` (Python's Unicode classes kept); a pattern RE2 cannot take (a
    look-around, say) fails at import, loudly."""
    opts = re2.Options()
    opts.case_sensitive = not ignore_case
    opts.max_mem = MAX_MEM
    opts.log_errors = False
    try:
        return re2.compile(python_classes(pattern), opts)
    except re2.error as e:
        raise ValueError(f"RE2 cannot compile scanner pattern {pattern!r}: {e}") from None


def utf8(text: str) -> bytes:
    """`text` as RE2 reads it; lone surrogates (valid JSON escapes) pass through instead of raising."""
    return text.encode("utf-8", "surrogatepass")


def decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def char_before(data: bytes, i: int) -> tuple[str, int]:
    """The character that ends at byte `i` and the byte it starts at; ("", i) at the start."""
    if i <= 0:
        return "", 0
    j = i - 1
    while j > 0 and data[j] & 0xC0 == 0x80:  # UTF-8 continuation bytes
        j -= 1
    return decode(data[j:i]), j


def next_char(data: bytes, i: int) -> int:
    """The byte offset of the character after the one starting at byte `i`."""
    i += 1
    while i < len(data) and data[i] & 0xC0 == 0x80:
        i += 1
    return i


def char_offsets(data: bytes, byte_offsets: list[int]) -> dict[int, int]:
    """Byte offsets into `data` (UTF-8) mapped to character offsets, in one pass over the text."""
    out, last_b, last_c = {}, 0, 0
    for b in sorted(set(byte_offsets)):
        last_c += len(decode(data[last_b:b]))
        out[b], last_b = last_c, b
    return out


def char_at(data: bytes, i: int) -> str:
    """The character that starts at byte `i`; "" at the end."""
    return decode(data[i:next_char(data, i)]) if i < len(data) else ""


def sub(pattern: Regexp, fn, text: str) -> str:
    """`text` with every match of `pattern` replaced by `fn(matched text)`, in one linear pass."""
    data, out, last = utf8(text), [], 0
    for m in pattern.finditer(data):
        start, end = m.span()
        out += [data[last:start], utf8(fn(decode(m.group())))]
        last = end
    if not out:
        return text
    out.append(data[last:])
    return decode(b"".join(out))
