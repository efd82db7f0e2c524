"""Tokenise a rendered chat piece by piece: the fast path of processor.tokenize_batch.

A chat rendered by its template is `w0 c0 w1 c1 ... wn`: the message contents c, in order, between
template wrappers w (role headers, end-of-turn marks, the default system prompt). Each row is
rendered once and its contents are found in the text in order. Wrappers repeat across rows, so each
distinct one is tokenised once into a cache. A plain-ASCII content is split into pre-tokens by the
tokenizer's own split pattern, and each distinct pre-token goes through the tokenizer's BPE once;
any other content is tokenised alone by the tokenizer.

Tokenising the pieces alone equals tokenising the whole text only when every piece boundary is also
a pre-token boundary in the whole text. For byte-level BPE with GPT-2's split pattern (SmolLM2 and
other GPT-2 style tokenizers) that holds when each boundary has an added token (split off before
pre-tokenisation) or a single "\\n" on the wrapper side and a non-space character on the content
side: no alternative of the pattern joins "\\n" with what follows it or a non-space with a space after
it. So a row is tokenised piecewise only when every boundary is of that kind, no content holds an
added token's text, and every reply sits between the template's generation prompt and end-of-turn
mark (Layout). Any other row, and every row of any other kind of tokenizer, gets the character
spans of its replies instead (`Spans`), for one whole-text tokenisation with offsets; a row whose
contents cannot be found that way returns None and takes the prefix-rendering path (processor),
which is exact for any template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

from tokenizers import models, pre_tokenizers

from training.data.skeleton import Skeletons

IGNORE = -100
# Printable ASCII and "\n", no space at either end: " " and "\n" are its only whitespace.
_PLAIN = re.compile(r"[!-~](?:[ -~\n]*[!-~])?").fullmatch
CACHE_LIMIT = 200_000  # distinct pieces kept; cleared when full, so memory stays flat on any data


@dataclass(frozen=True)
class Layout:
    """The template text an assistant reply sits between, learned from the template by processor."""

    gen_prompt: str  # what add_generation_prompt appends: it ends the wrapper before a reply
    end_of_turn: str  # what follows a reply, trailing whitespace cut: trained with the reply


class Spans(list):
    """Character spans of a row's trained replies (end-of-turn included), for whole-text tokenisation."""


class Wrapper(NamedTuple):
    ids: list[int]
    masked: list[int]  # every label IGNORE
    closing: list[int]  # the tokens of a leading end-of-turn trained, the rest IGNORE
    opens_reply: bool  # ends with the generation prompt
    closes_reply: bool  # starts with the end-of-turn
    open_left: bool  # its start is a pre-token boundary after a content
    open_right: bool  # its end is a pre-token boundary before a content


def piecewise_exact(tokenizer) -> bool:
    """Whether boundaries as described above are pre-token boundaries: byte-level BPE, GPT-2 pattern."""
    bt = tokenizer.backend_tokenizer
    pre, model = bt.pre_tokenizer, bt.model
    return (bt.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
            and not pre.add_prefix_space and isinstance(model, models.BPE) and not model.dropout)


class Piecewise:
    """Per tokenizer and template: the caches and the row encoder. `tokenise=False`: spans only."""

    def __init__(self, tokenizer, layout: Layout, *, tokenise: bool):
        self.bt = tokenizer.backend_tokenizer
        self.layout = layout
        self.tokenise = tokenise
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))).search if added else (lambda s: None)
        self._starts = tuple(added)
        self.wrappers: dict[str, Wrapper] = {}
        self.words: dict[str, tuple[int, ...]] = {}  # " word" chunk -> its tokens
        self.skeletons = Skeletons(tokenizer)  # the rows' texts, mostly without rendering

    def row(self, text: str, chat: list[dict], last_only: bool, all_trained: bool):
        """(input_ids, labels), or Spans when only the spans are safe, or None (not found)."""
        wrappers, words = self.wrappers, self.words
        if len(words) > CACHE_LIMIT or len(wrappers) > CACHE_LIMIT:
            words.clear()
            wrappers.clear()
        last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=-1) if last_only else None
        ids: list[int] = []
        labels: list[int] = []
        starts: list[int] = []
        pos, closing, piecewise = 0, False, self.tokenise
        for i, m in enumerate(chat):
            c = m["content"]
            at = text.find(c, pos)
            if at < 0 or not c:
                return None
            w = wrappers.get(text[pos:at]) or self._wrapper(text[pos:at])
            reply = m["role"] == "assistant"
            if (reply and not w.opens_reply) or (closing and not w.closes_reply):
                return None
            starts.append(at)
            if piecewise:
                piece = self._content(c) if (pos == 0 or w.open_left) and (at == 0 or w.open_right) else None
                if piece is None:
                    piecewise = False
                else:
                    ids += w.ids
                    labels += w.closing if closing else w.masked
                    trained = reply and (last is None or i == last)
                    labels += piece if trained else [IGNORE] * len(piece)
                    ids += piece
            closing = reply and (last is None or i == last)
            pos = at + len(c)
        tail = wrappers.get(text[pos:]) or self._wrapper(text[pos:])
        if closing and not tail.closes_reply:
            return None
        if piecewise and (tail.open_left or pos == len(text)):
            ids += tail.ids
            labels += tail.closing if closing else tail.masked
            return ids, (list(ids) if all_trained else labels)
        return self._spans(chat, starts, last)

    def _spans(self, chat: list[dict], starts: list[int], last: int | None) -> Spans:
        eot = self.layout.end_of_turn
        return Spans((at, at + len((m["content"] + eot).rstrip())) for i, (m, at) in enumerate(zip(chat, starts))
                     if m["role"] == "assistant" and (last is None or i == last))

    def _content(self, c: str) -> list[int] | None:
        """The content's tokens, or None when its ends or an added token's text make pieces unsafe."""
        if self._added(c):
            return None
        if _PLAIN(c) and "  " not in c and " \n" not in c and "\n " not in c:
            # Every space sits between two non-spaces, so each " word" is pre-tokenised on its own.
            chunks = c.replace(" ", "\0 ").split("\0")
            try:  # all in C while every chunk is cached, as nearly all are after the first rows
                return list(chain.from_iterable(map(self.words.__getitem__, chunks)))
            except KeyError:
                return self._words(chunks)
        if c[0].isspace() or c[-1].isspace() or "\u180e" in (c[0], c[-1]):  # U+180E: a space in older Unicode
            return None
        return self.bt.encode(c, add_special_tokens=False).ids

    def _words(self, chunks: list[str]) -> list[int]:
        """Tokenise and cache each new chunk: the tokenizer's own pre-tokens, each through its BPE."""
        pre, model = self.bt.pre_tokenizer, self.bt.model
        for ch in chunks:
            if ch not in self.words:
                self.words[ch] = tuple(t.id for p, _ in pre.pre_tokenize_str(ch) for t in model.tokenize(p))
        return list(chain.from_iterable(map(self.words.__getitem__, chunks)))

    def _wrapper(self, w: str) -> Wrapper:
        enc = self.bt.encode(w, add_special_tokens=False)
        eot = self.layout.end_of_turn
        n = len(eot) if w.startswith(eot) else 0
        # The labels processor._masked gives the wrapper's tokens inside the span's end-of-turn part.
        closing = [t if s < e <= n else IGNORE for t, (s, e) in zip(enc.ids, enc.offsets)]
        left = w.startswith(self._starts) or w.startswith("\n")
        right = w.endswith(self._starts) or (w.endswith("\n") and not w[-2:-1].isspace())
        v = self.wrappers[w] = Wrapper(enc.ids, [IGNORE] * len(enc.ids), closing, w.endswith(self.layout.gen_prompt),
                                       w.startswith(eot), bool(w) and left, bool(w) and right)
        return v
