"""What the classifier reads of a text: the text as it looks, with common disguises undone.

First NFKC and no invisible characters, as the normalise scanner gives serving (applied here too, so
training and the test split read what serving reads). Then, for the classifier only (the model still
gets the text as written): Cyrillic and Greek letters that look Latin become Latin inside Latin
words, digits and symbols standing for letters inside words become those letters, s p a c e d or
d.o.t.t.e.d letters are joined, and rAnDoM cAsE becomes lower case.
"""

from __future__ import annotations

from guardrails import linear
from guardrails.visible import visible

# Look-alikes of Latin letters (lower and upper case), from Cyrillic and Greek.
_CONFUSABLE = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s",
    "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "к": "k", "м": "m", "т": "t", "в": "b", "н": "h",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "Х": "X", "У": "Y", "І": "I", "Ѕ": "S", "Ј": "J",
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "υ": "u", "ε": "e",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X"})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})

_HAS_LATIN = linear.compile(r"[A-Za-z]")
# A word mixing letters with look-alike digits or symbols: "1gn0re", "pa$$word", "h@ck".
_LEET_WORD = linear.compile(r"[A-Za-z]*[0-9@$!][A-Za-z0-9@$!]*[A-Za-z][A-Za-z0-9@$!]*|[A-Za-z]+[0-9@$][0-9@$!]*")
# Five or more single letters with one separator between each: "i g n o r e", "p.a.s.s"; and four or
# more Chinese characters with spaces between them.
_SPACED = linear.compile(r"(?:\b[A-Za-z][ .\-_*|/]){4,}[A-Za-z]\b|(?:\p{Han} ){3,}\p{Han}")
_SEPARATORS = str.maketrans("", "", " .-_*|/")


def _odd_case(word: str) -> bool:
    """Upper case after the first letter, in a word that is not all capitals ("coULd", "iPhone")."""
    return not word.isupper() and not word[1:].islower()


def _uncased(text: str) -> str:
    """Lower case when at least three words, and half the cased words of three letters or more, flip
    case inside: a disguise (random case makes most words odd), not a few brand names."""
    words = [w for w in (t.strip(".,;:!?\"'()[]") for t in text.split()) if len(w) >= 3 and w.lower() != w.upper()]
    odd = sum(_odd_case(w) for w in words)
    return text.lower() if odd >= 3 and odd >= 0.5 * len(words) else text


def classifier_view(text: str) -> str:
    text = _uncased(visible(text))
    if _HAS_LATIN.search(linear.utf8(text)) is not None:
        text = text.translate(_CONFUSABLE)
    text = linear.sub(_SPACED, lambda m: m.translate(_SEPARATORS), text)
    return linear.sub(_LEET_WORD, lambda m: m.translate(_LEET) if any(c.isalpha() for c in m) else m, text)
