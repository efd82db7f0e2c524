"""Conversation -> (input_ids, labels) with the model's own chat template.

Labels cover assistant replies and their end-of-turn token, so the model learns to stop. The
assistant spans are found by rendering growing prefixes of the conversation: the text a reply
adds after the generation prompt is exactly what the model must produce.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.data.readers import Message

IGNORE = -100


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
    """tokenize_conversation for many rows, with one batched call into the fast tokenizer.

    Rows that fit max_length (nearly all) are masked straight from the batch; a row that is too long
    goes through tokenize_conversation, which drops its oldest turns. The result is the same.
    """
    rendered = []
    for conv in convs:
        text, spans = assistant_spans(tokenizer, with_system(conv, opts.system_prompt))
        rendered.append((text, spans[-1:] if opts.mask_history else spans))
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
