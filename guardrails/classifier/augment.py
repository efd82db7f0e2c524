"""Variants of each seed, made inside its own split: disguised (homoglyphs, invisible characters,
leetspeak, spacing, case), one turn of a conversation, or buried in a long text. Benign seeds get the
same treatment, so a disguise or a long text is never itself the signal. Deterministic per seed."""

from __future__ import annotations

import random
from dataclasses import replace

from guardrails.classifier.data import Row

_HOMOGLYPH = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "i": "і", "s": "ѕ", "y": "у"}
_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
_INVISIBLE = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")


def _homoglyphs(text: str, rng: random.Random) -> str:
    return "".join(_HOMOGLYPH[c] if c in _HOMOGLYPH and rng.random() < 0.5 else c for c in text)


def _invisible(text: str, rng: random.Random) -> str:
    return "".join(c + rng.choice(_INVISIBLE) if c.isalpha() and rng.random() < 0.3 else c for c in text)


def _leet(text: str, rng: random.Random) -> str:
    return "".join(_LEET[c.lower()] if c.lower() in _LEET and rng.random() < 0.5 else c for c in text)


def _spaced(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    i = rng.randrange(len(words))
    words[i] = " ".join(words[i]) if len(words[i]) > 3 else words[i]
    return " ".join(words)


def _case(text: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in text)


DISGUISES = {"homoglyph": _homoglyphs, "invisible": _invisible, "leet": _leet, "spaced": _spaced, "case": _case}


def _variants(row: Row, pool: list[Row], rng: random.Random) -> list[Row]:
    """Two variants of `row`: one disguise, and one context (a prior turn, or a long text around it).
    `pool`: benign seeds of the same split and language, the context's source."""
    name = rng.choice(sorted(DISGUISES))
    out = [replace(row, text=DISGUISES[name](row.text, rng), form="obfuscated", variant=name)]
    others = [p for p in pool if p.seed != row.seed]
    if not others:
        return out
    if rng.random() < 0.5:
        turn = rng.choice(others).text
        out.append(replace(row, text=f"{turn}\n{row.text}", form="multi_turn", variant="after_turn"))
    else:
        before = " ".join(rng.choice(others).text for _ in range(rng.randint(1, 3)))
        after = " ".join(rng.choice(others).text for _ in range(rng.randint(0, 3)))
        out.append(replace(row, text=f"{before}\n\n{row.text}\n\n{after}".strip(), form="long", variant="buried"))
    return out


def augment(rows: list[Row], seed: int = 0) -> list[Row]:
    """The seeds plus their variants. Contexts come from benign seeds of the row's own split and language."""
    pools: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if not r.labels and r.form not in ("long", "multi_turn"):
            pools.setdefault((r.split, r.lang), []).append(r)
    out = list(rows)
    for r in rows:
        rng = random.Random(f"{seed}:{r.seed}")
        out += _variants(r, pools.get((r.split, r.lang), []), rng)
    return out
