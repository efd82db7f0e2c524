"""Retrieved chunks into a chat prompt, numbered [1], [2]... so replies can cite them."""

from __future__ import annotations

from rag.index import Hit

INSTRUCTION = ("Use these sources to answer; cite them as [n]. If they do not contain the answer, say that you "
               "are not sure rather than guessing.")


def with_context(messages: list[dict], hits: list[Hit], system_prompt: str | None = None) -> list[dict]:
    """`messages` with the sources appended to the system turn (one is added when there is none).

    `system_prompt` is the persona to keep when `messages` has no system turn (e.g. the adapter's
    manifest prompt): without it the added turn would stand in for the template's default prompt.
    """
    if not hits:
        return list(messages)
    listed = "\n\n".join(f"[{n}] ({h.source})\n{h.text.strip()}" for n, h in enumerate(hits, 1))
    block = f"{INSTRUCTION}\n\n{listed}"
    if messages and messages[0].get("role") == "system":
        first, rest = messages[0], list(messages[1:])
        content = first.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts
            return [{**first, "content": [*content, {"type": "text", "text": block}]}, *rest]
        return [{**first, "content": f"{content}\n\n{block}" if content else block}, *rest]
    content = f"{system_prompt}\n\n{block}" if system_prompt else block
    return [{"role": "system", "content": content}, *messages]


def citations(hits: list[Hit]) -> list[dict]:
    """What [n] refers to, for the response body."""
    return [{"index": n, "source": h.source, "chunk": h.chunk, "score": round(h.score, 4)}
            for n, h in enumerate(hits, 1)]
