"""Token logprobs in OpenAI's two shapes, from the engine's TokenLogprob steps (vLLM's server rules)."""

from __future__ import annotations

from serving.engines.base import TokenLogprob


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}


def chat(steps: list[TokenLogprob], top: int) -> dict:
    """Chat completions: per token, its logprob and the `top` best alternatives."""
    return {"content": [_entry(s.token, s.logprob) | {"top_logprobs": [_entry(t, lp) for t, lp in s.top[:top]]}
                        for s in steps]}


def completion(steps: list[TokenLogprob], top: int, offset: int = 0) -> dict:
    """Completions: parallel lists, and per token a map of up to `top` + 1 alternatives (OpenAI's rule)."""
    text_offset, pos = [], offset
    for s in steps:
        text_offset.append(pos)
        pos += len(s.token)
    return {"text_offset": text_offset, "token_logprobs": [s.logprob for s in steps],
            "tokens": [s.token for s in steps], "top_logprobs": [dict(s.top[:top + 1]) for s in steps]}
