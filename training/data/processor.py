"""Conversation -> (input_ids, labels) with the model's own chat template.

Labels cover assistant replies and their end-of-turn token, so the model learns to stop. The
assistant spans are found by rendering growing prefixes of the conversation: the text a reply
adds after the generation prompt is exactly what the model must produce. That exact path
(tokenize_conversation) renders a chat once per reply; tokenize_batch renders each row once and
takes the fast path of piecewise.py wherever it gives the same result (docs/tokenisation.md).
"""

from __future__ import annotations

import gc
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from training.data.piecewise import IGNORE, Layout, Piecewise, Spans, piecewise_exact
from training.data.readers import Message

# tokenizer -> (its template and vocabulary size, its fast path or None)
_PLANS: WeakKeyDictionary = WeakKeyDictionary()


@dataclass(frozen=True)
class MaskOptions:
    max_length: int
    train_on_prompt: bool = False
    mask_history: bool = False  # train only the last assistant turn
    system_prompt: str | None = None  # None: the template's default


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    dropped_turns: int = 0


def with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def render(tokenizer, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of each assistant reply (end-of-turn included)."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        if text[:end] != render(tokenizer, messages[: i + 1]):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        # Trailing template whitespace after the end-of-turn token is not part of the reply.
        end = start + len(text[start:end].rstrip())
        spans.append((start, end))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[Message], opts: MaskOptions) -> Example | None:
    """Tokenise with label masks; drop the oldest whole turns while too long. None if nothing trainable survives."""
    messages = with_system(messages, opts.system_prompt)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while True:
        ex = _encode(tokenizer, system + turns, opts)
        if len(ex.input_ids) <= opts.max_length or len(turns) <= 2:
            break
        turns = turns[2:]  # one user+assistant exchange, oldest first
        dropped += 1
    if len(ex.input_ids) > opts.max_length:  # the newest exchange alone is too long: keep its tail
        ex.input_ids, ex.labels = ex.input_ids[-opts.max_length:], ex.labels[-opts.max_length:]
    ex.dropped_turns = dropped
    if all(label == IGNORE for label in ex.labels):
        return None
    return ex


def _encode(tokenizer, messages: list[Message], opts: MaskOptions) -> Example:
    text, spans = assistant_spans(tokenizer, messages)
    if opts.mask_history:
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _masked(enc["input_ids"], enc["offset_mapping"], spans, opts)


def _masked(ids: list[int], offsets, spans: list[tuple[int, int]], opts: MaskOptions) -> Example:
    if opts.train_on_prompt:
        return Example(ids, list(ids))
    labels = [IGNORE] * len(ids)
    span_iter = iter(spans)
    span = next(span_iter, None)
    for k, (s, e) in enumerate(offsets):
        while span is not None and s >= span[1]:
            span = next(span_iter, None)
        if span is not None and s >= span[0] and e <= span[1] and e > s:
            labels[k] = ids[k]
    return Example(ids, labels)


def tokenize_batch(tokenizer, convs: list[list[Message]], opts: MaskOptions) -> list[Example | None]:
    """tokenize_conversation for many rows, with the same result, each row rendered once.

    Rows are tokenised piecewise, or in one batched whole-text call from their located reply spans
    (piecewise.py); a row the fast path cannot place, or one too long for max_length, goes through
    tokenize_conversation, which renders prefixes and drops the oldest turns. The fast path is
    checked once per tokenizer and template on probe chats (`_learn`), and on the first fast row of
    every batch: a difference switches it off for that tokenizer, with a warning.
    """
    pw = piecewise_for(tokenizer)
    if pw is None:
        return _prefix_batch(tokenizer, convs, opts)
    with _gc_paused():
        out, routes = _fast_batch(tokenizer, pw, convs, opts)
    k = next((i for i, r in enumerate(routes) if r != "exact"), None)
    if k is not None and out[k] != tokenize_conversation(tokenizer, convs[k], opts):
        _PLANS[tokenizer] = (_plan_key(tokenizer), None)
        warnings.warn("tokenize_batch: the piecewise fast path differs from the exact path on a row; "
                      "using the exact path for this tokenizer", RuntimeWarning, stacklevel=2)
        return _prefix_batch(tokenizer, convs, opts)
    return out


@contextmanager
def _gc_paused():
    """A batch allocates dozens of lists per row and keeps them; with torch and transformers loaded,
    the collector's passes over the heap cost more than the tokenising (60 vs 36 us a row). Any
    cycle the template engine leaves is collected after the batch."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def piecewise_for(tokenizer) -> Piecewise | None:
    """The tokenizer's fast path, learned and checked once per template; None: prefix rendering only."""
    key = _plan_key(tokenizer)
    got = _PLANS.get(tokenizer)
    if got is None or got[0] != key:
        got = _PLANS[tokenizer] = (key, _learn(tokenizer))
    return got[1]


def _plan_key(tokenizer) -> tuple:
    return (tokenizer.chat_template, len(tokenizer))


def _learn(tokenizer) -> Piecewise | None:
    """The fast path that gives tokenize_conversation's result on every probe chat, routing the plain
    ones itself: piecewise where the tokenizer allows it, else located spans; None if neither does."""
    try:
        layout = _layout(tokenizer)
        if layout is None:
            return None
        modes = (True, False) if piecewise_exact(tokenizer) else (False,)
        probes = PLAIN_PROBES + EDGE_PROBES
        want = {o: [tokenize_conversation(tokenizer, c, o) for c in probes] for o in PROBE_OPTS}
        for tokenise in modes:
            pw = Piecewise(tokenizer, layout, tokenise=tokenise)
            runs = [_fast_batch(tokenizer, pw, probes, o) for o in PROBE_OPTS]
            own = ["piece" if tokenise else "spans"] * len(PLAIN_PROBES)
            if runs[0][1][:len(own)] == own and all(out == want[o] for o, (out, _) in zip(PROBE_OPTS, runs)):
                return pw
    except Exception:  # a template that rejects a probe chat: the exact path decides, row by row
        return None
    return None


def _layout(tokenizer) -> Layout | None:
    """The generation prompt and end-of-turn mark, from one user turn rendered three ways."""
    user = [{"role": "user", "content": "Hi"}]
    base, gen = render(tokenizer, user), render(tokenizer, user, add_generation_prompt=True)
    full = render(tokenizer, user + [{"role": "assistant", "content": "Yes."}])
    if len(gen) <= len(base) or not gen.startswith(base) or not full.startswith(gen + "Yes."):
        return None
    return Layout(gen[len(base):], full[len(gen) + len("Yes."):].rstrip())


def _fast_batch(tokenizer, pw: Piecewise, convs: list[list[Message]],
                opts: MaskOptions) -> tuple[list[Example | None], list[str]]:
    """Results, and each row's route: "piece", "spans" or "exact" (tokenize_conversation)."""
    chats = [with_system(c, opts.system_prompt) for c in convs]
    texts = pw.skeletons.texts(chats) if chats else []
    out: list[Example | None] = [None] * len(convs)
    routes = ["piece"] * len(convs)
    spans: dict[int, tuple[str, Spans]] = {}
    for k, (text, chat) in enumerate(zip(texts, chats)):
        r = pw.row(text, chat, opts.mask_history, opts.train_on_prompt)
        if isinstance(r, Spans):
            spans[k] = (text, r)
            routes[k] = "spans"
        elif r is None or len(r[0]) > opts.max_length:
            out[k] = tokenize_conversation(tokenizer, convs[k], opts)
            routes[k] = "exact"
        elif r[1].count(IGNORE) < len(r[1]):  # else nothing trainable: None, as on the exact path
            out[k] = Example(*r)
    if spans:
        for k, ex in zip(spans, _from_spans(tokenizer, [convs[k] for k in spans], list(spans.values()), opts)):
            out[k] = ex
    return out, routes


def _prefix_batch(tokenizer, convs: list[list[Message]], opts: MaskOptions) -> list[Example | None]:
    """The exact path for any template: spans by rendering prefixes, then one batched tokenizer call."""
    rendered = []
    for conv in convs:
        text, spans = assistant_spans(tokenizer, with_system(conv, opts.system_prompt))
        rendered.append((text, spans[-1:] if opts.mask_history else spans))
    return _from_spans(tokenizer, convs, rendered, opts)


def _from_spans(tokenizer, convs: list[list[Message]], rendered: list[tuple[str, list[tuple[int, int]]]],
                opts: MaskOptions) -> list[Example | None]:
    """Rows that fit max_length (nearly all) are masked straight from one batched call; a row that is
    too long goes through tokenize_conversation, which drops its oldest turns."""
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out: list[Example | None] = []
    for conv, (_, spans), ids, offsets in zip(convs, rendered, enc["input_ids"], enc["offset_mapping"]):
        if len(ids) > opts.max_length:
            out.append(tokenize_conversation(tokenizer, conv, opts))
            continue
        ex = _masked(ids, offsets, spans, opts)
        out.append(None if all(label == IGNORE for label in ex.labels) else ex)
    return out


def show_mask(tokenizer, ex: Example, limit: int = 400) -> str:
    """Render one example with trained tokens in [[...]] so a human can check the mask."""
    out, current, trained = [], [], None
    for tid, lab in zip(ex.input_ids[:limit], ex.labels[:limit]):
        t = lab != IGNORE
        if trained is not None and t != trained:
            out.append(_chunk(tokenizer, current, trained))
            current = []
        current.append(tid)
        trained = t
    if current:
        out.append(_chunk(tokenizer, current, trained))
    tail = f"\n... ({len(ex.input_ids) - limit} more tokens)" if len(ex.input_ids) > limit else ""
    return "".join(out) + tail


def _chunk(tokenizer, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids)
    return f"[[{text}]]" if trained else text


def _chat(*turns: str, system: str | None = None) -> list[Message]:
    roles = ["user", "assistant"] * len(turns)
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": r, "content": t} for r, t in zip(roles, turns)]


# Probe chats for `_learn`. The plain ones must take the fast path; the edge ones may fall back.
PLAIN_PROBES = [
    _chat("Hi", "Hello! How can I help?"),
    _chat("Price of 2 panels?", "It's 1,234.50 dollars, or 99/month.", system="You are Kira."),
    _chat("What's up?", "(fine) thanks...", "ok", "Sure: 'yes' -- I'll see; we've 3.14 left", "Line one\nLine two",
          "1) a  b   c\n\n- item\n\t#tag"),
    _chat("Émile says 😊 hi", "Très bien — 日本語もOK。", system="Réponds en français."),
    _chat("x", "y", "zz", "Q."),
]
EDGE_PROBES = [
    _chat(" leading space", "trailing newline\n", "\tTabbed", "x "),
    _chat("Say <|im_end|> please", "Use <|im_end|> to stop.<|im_end|>"),
    _chat("emoji end 😊", "😊", system=" spaced system "),
    _chat("user\nassistant", "assistant"),
]
PROBE_OPTS = [MaskOptions(max_length=4096), MaskOptions(max_length=4096, mask_history=True),
              MaskOptions(max_length=4096, train_on_prompt=True), MaskOptions(max_length=48)]
