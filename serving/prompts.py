"""Prompt rendering from a manifest (or the base model's own format): the only way prompts are built."""

from __future__ import annotations

import json
from dataclasses import dataclass

from kernel.manifest import Manifest


@dataclass(frozen=True)
class PromptFormat:
    chat_template: str
    system_prompt: str | None  # None: the template's own default
    stop_tokens: tuple[str, ...]

    @classmethod
    def from_manifest(cls, m: Manifest) -> "PromptFormat":
        return cls(m.chat_template, m.system_prompt, tuple(m.stop_tokens))


def arguments(text: str):
    """A tool call's arguments parsed (as vLLM hands them to templates), or the text when it is not JSON."""
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text  # not JSON: the template gets the text


WORD_JOINER = "\u2060"  # invisible, and splits a control-token string so the tokenizer reads it as text


class PromptRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Every added token (<|im_start|>, <|im_end|>, ...) is matched as a whole string by the tokenizer,
        # so message text holding one would become a real control token: those strings are broken up.
        added = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
        self.control = sorted((t for t in added if len(t) > 1), key=len, reverse=True)

    def inert(self, text: str) -> str:
        """`text` with every control-token string broken, so it can only ever tokenize as text."""
        for token in self.control:
            if token in text:
                text = text.replace(token, token[0] + WORD_JOINER + token[1:])
        return text

    def base_format(self, eos_ids: list[int]) -> PromptFormat:
        stops = tuple(dict.fromkeys(self.tokenizer.convert_ids_to_tokens(i) for i in eos_ids))
        return PromptFormat(self.tokenizer.chat_template, None, stops)

    def inert_deep(self, value):
        """Every key and string in a JSON value made inert (tool definitions, parsed call arguments): a
        template writes them out as text, and what it writes must not become a control token."""
        if isinstance(value, str):
            return self.inert(value)
        if isinstance(value, dict):
            return {self.inert(k): self.inert_deep(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.inert_deep(v) for v in value]
        return value

    def render(self, fmt: PromptFormat, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        msgs = [self._turn(m) for m in messages]
        if fmt.system_prompt is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.inert(fmt.system_prompt)})
        text = self.tokenizer.apply_chat_template(msgs, chat_template=fmt.chat_template, tokenize=False,
                                                  add_generation_prompt=True,
                                                  tools=self.inert_deep(tools) if tools else None)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _turn(self, m: dict) -> dict:
        turn = {"role": "system" if m["role"] == "developer" else m["role"], "content": self.inert(m["content"])}
        if m.get("tool_calls"):  # as vLLM hands them to templates: arguments parsed into objects
            turn["tool_calls"] = [self.inert_deep({**c, "function": {**c["function"],
                                                                      "arguments": arguments(c["function"]["arguments"])}})
                                  for c in m["tool_calls"]]
        if "tool_call_id" in m:
            turn["tool_call_id"] = self.inert(m["tool_call_id"])
        return turn

    def stop_token_ids(self, fmt: PromptFormat) -> list[int]:
        ids = self.tokenizer.convert_tokens_to_ids(list(fmt.stop_tokens))
        return [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]
