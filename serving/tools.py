"""Tool calling: the JSON schema that forces a call, and the calls read back out of a reply.

`tool_choice` named or "required" is guided decoding, as vLLM's server does it with a parser whose
`supports_required_and_named` holds: a named call's output is its arguments; "required" outputs a JSON
array of {name, parameters}. Neither needs a model-specific parser. `tool_choice` "auto" does: the serve
config's `tool_call_parser` names one of vLLM's tool parsers, which reads calls out of free text.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass

from serving.errors import APIError
from serving.protocol import ChatCompletionRequest, NamedToolChoice


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str  # JSON text

    def wire(self, index: int | None = None) -> dict:
        body = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return body if index is None else {"index": index, **body}


def texts(value) -> list[str]:
    """Every key and string in a JSON value: what the input scanners read of tool definitions and calls."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in (k, *texts(v))]
    if isinstance(value, list):
        return [t for v in value for t in texts(v)]
    return []


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's shape


def mode(req: ChatCompletionRequest) -> str:
    """"none", "auto", "required" or "named": what the request asks of tools (vLLM's default: auto with tools)."""
    if not req.tools:
        return "none"
    if isinstance(req.tool_choice, NamedToolChoice):
        return "named"
    return req.tool_choice or "auto"


def parameters(spec) -> dict:
    """A function's parameters schema; none given: any object (vLLM's rule)."""
    return spec.parameters if spec.parameters else {"type": "object", "properties": {}}


def forced_schema(req: ChatCompletionRequest) -> dict | None:
    """The JSON schema the reply is decoded to when a call is forced; None when it is not."""
    kind = mode(req)
    specs = {t.function.name: t.function for t in req.tools or []}
    if kind == "named":
        return parameters(specs[req.tool_choice.function.name])
    if kind != "required":
        return None
    defs: dict = {}
    items = []
    for spec in specs.values():
        params = copy.deepcopy(parameters(spec))
        for name, sub in params.pop("$defs", {}).items():  # lifted to the top, where references resolve
            if defs.setdefault(name, sub) != sub:
                raise APIError(400, f"tool definition '{name}' has several schemas", param="tools")
        items.append({"properties": {"name": {"type": "string", "enum": [spec.name]}, "parameters": params},
                      "required": ["name", "parameters"]})
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema | ({"$defs": defs} if defs else {})


class ToolReader:
    """Reads a reply's tool calls. "auto" needs vLLM's tool parser, made once per server from its name."""

    def __init__(self, parser_name: str | None, tokenizer):
        self.parser_name, self.tokenizer = parser_name, tokenizer
        self._parser_cls = None
        if parser_name is not None:
            from vllm.tool_parsers import ToolParserManager  # only a server with auto tool choice needs vLLM's parsers

            try:
                self._parser_cls = ToolParserManager.get_tool_parser(parser_name)
            except KeyError:
                raise ValueError(f"tool_call_parser '{parser_name}' is not one of vLLM's tool parsers") from None

    def check(self, req: ChatCompletionRequest) -> None:
        if mode(req) == "auto" and self._parser_cls is None:
            raise APIError(400, '"auto" tool choice needs a tool parser: set tool_call_parser in the serve config '
                                '(e.g. hermes), or use tool_choice "required" or a named function',
                           param="tool_choice", code="tool_choice_unsupported")

    def reader(self, req: ChatCompletionRequest, streamed: bool = False):
        """read() for one request's replies: vLLM's parser and request model are made once, not per choice."""
        made = {}

        def read(text: str) -> tuple[list[Call], str | None]:
            if mode(req) == "auto" and not made:
                made["parse"] = self._auto_parser(req)
            return self.read(req, text, streamed, made.get("parse"))
        return read

    def read(self, req: ChatCompletionRequest, text: str, streamed: bool = False,
             parse=None) -> tuple[list[Call], str | None]:
        """(calls, content): the calls in `text`, and what is left of it as content. "required" arguments are
        re-serialised, except in a stream, which carries them as written (vLLM's server does both)."""
        kind = mode(req)
        if kind == "named":
            if not text.strip():
                return [], None
            return [Call(call_id(), req.tool_choice.function.name, text)], None
        if kind == "required":
            return _required_calls(text, raw=streamed), None
        if kind == "auto":
            calls, content = (parse or self._auto_parser(req))(text)
            return (calls[:1] if req.parallel_tool_calls is False else calls), content
        return [], text

    def _auto_parser(self, req: ChatCompletionRequest):
        """vLLM's parser over vLLM's own request model (what its extract_tool_calls reads)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VLLMRequest

        vreq = VLLMRequest.model_validate(req.model_dump(mode="json", exclude_none=True, by_alias=True))
        parser = self._parser_cls(self.tokenizer, vreq.tools)

        def parse(text: str) -> tuple[list[Call], str | None]:
            info = parser.extract_tool_calls(text, request=vreq)
            if not info.tools_called:
                return [], info.content if info.content is not None else text
            return ([Call(c.id or call_id(), c.function.name, c.function.arguments) for c in info.tool_calls],
                    info.content)
        return parse


def _required_calls(text: str, raw: bool = False) -> list[Call]:
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                              and isinstance(i.get("parameters"), dict) for i in items):
        return []
    if raw:
        return [Call(call_id(), i["name"], span) for i, span in zip(items, _parameter_spans(text))]
    return [Call(call_id(), i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]


def _parameter_spans(text: str) -> list[str]:
    """Each item's "parameters" value as written in `text`, a JSON array of objects already known valid."""
    decode, spans = json.JSONDecoder().raw_decode, []
    pos = _skip(text, text.index("[") + 1)
    while text[pos] == "{":
        pos = _skip(text, pos + 1)
        while text[pos] != "}":
            key, pos = decode(text, pos)
            pos = _skip(text, _skip(text, pos) + 1)  # past the colon
            start = pos
            _, pos = decode(text, pos)
            if key == "parameters":
                spans.append(text[start:pos])
            pos = _skip(text, pos)
            pos = _skip(text, pos + 1) if text[pos] == "," else pos
        pos = _skip(text, pos + 1)
        pos = _skip(text, pos + 1) if text[pos] == "," else pos
    return spans


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos
