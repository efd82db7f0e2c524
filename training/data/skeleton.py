"""Chat text without running the template, for contents a template has no reason to look inside.

Rendering the chat template (sandboxed Jinja) was the largest single cost of the fast path. For most
rows the text is only the template's wrappers around the contents, verbatim: `w0 c0 w1 ... wn`, and
the wrappers depend on the sequence of roles alone. So per role sequence the template is rendered
twice, with two families of stand-in contents; where each stand-in appears once, in order, and both
give the same wrappers, a row with those roles is its contents between those wrappers.

A row is put together that way only when every content is opaque (`_OPAQUE`): printable ASCII and
inner newlines, no whitespace at either end, and none of the characters template logic keys on:
markup such as `<think>` or `[TOOL_CALLS]`, flags such as `/no_think`, quotes and backslashes a filter
would escape. Other rows, and rows with fields besides role and content, are rendered.
It is checked, not trusted: in every batch the first row of each role sequence is rendered as well,
and a difference turns this off for the tokenizer, with a warning. What no check here can see is a
template that branches on the words of an opaque content (no template we know of does); such a rule
is caught only when a batch's first row of that role sequence triggers it.
"""

from __future__ import annotations

import re
import warnings

_OPAQUE = re.compile(r"[A-Za-z0-9!#$%&'()*+,.:;=?@^_~-](?:[A-Za-z0-9 \n!#$%&'()*+,.:;=?@^_~-]*"
                     r"[A-Za-z0-9!#$%&'()*+,.:;=?@^_~-])?").fullmatch
# Opaque themselves; short and long (with inner newlines), so a template that branches on length shows it.
_FAMILIES = (lambda i: f"Qz{i}vK", lambda i: f"Wj {i} xq" + " Nn 42, (ok).\nYb" * 50)
LIMIT = 10_000  # role sequences kept


class Skeletons:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.on = True
        self.wrappers: dict[tuple[str, ...], list[str] | None] = {}  # None: this role sequence is rendered

    def texts(self, chats: list[list[dict]]) -> list[str]:
        """Each chat's rendered text, as apply_chat_template(chat, tokenize=False) gives it."""
        out: list[str | None] = [None] * len(chats)
        render: list[int] = []  # rows rendered: those not put together, and each role sequence's first
        first: set[tuple[str, ...]] = set()
        for k, chat in enumerate(chats):
            key = tuple(m["role"] for m in chat)
            out[k] = self._put_together(key, chat) if self.on else None
            if out[k] is None or key not in first:
                first.add(key)
                render.append(k)
        rendered = self.tokenizer.apply_chat_template([chats[k] for k in render], tokenize=False) if render else []
        for k, text in zip(render, rendered):
            if out[k] is not None and out[k] != text:
                self.on = False
                warnings.warn("chat text put together from the template's wrappers differs from the rendered "
                              "text; rendering every row for this tokenizer", RuntimeWarning, stacklevel=3)
                return self.tokenizer.apply_chat_template(chats, tokenize=False)
            out[k] = text
        return out

    def _put_together(self, key: tuple[str, ...], chat: list[dict]) -> str | None:
        if not all(len(m) == 2 and isinstance(m["content"], str) and _OPAQUE(m["content"]) for m in chat):
            return None
        if key not in self.wrappers:
            if len(self.wrappers) >= LIMIT:
                self.wrappers.clear()
            self.wrappers[key] = self._learn(key)
        w = self.wrappers[key]
        if w is None:
            return None
        return w[0] + "".join(m["content"] + after for m, after in zip(chat, w[1:]))

    def _learn(self, key: tuple[str, ...]) -> list[str] | None:
        """The wrappers of a role sequence, or None when stand-ins show the contents are not just inserted."""
        found = []
        for family in _FAMILIES:
            stand_ins = [family(i) for i in range(len(key))]
            try:
                text = self.tokenizer.apply_chat_template([{"role": r, "content": s} for r, s in zip(key, stand_ins)],
                                                          tokenize=False)
            except Exception:  # a template that rejects the sequence: its rows are rendered, and fail there
                return None
            if any(text.count(s) != 1 for s in stand_ins):
                return None
            parts, pos = [], 0
            for s in stand_ins:
                at = text.find(s, pos)
                if at < 0:
                    return None
                parts.append(text[pos:at])
                pos = at + len(s)
            found.append(parts + [text[pos:]])
        return found[0] if found[0] == found[1] else None
