"""Helpers for tests/test_openai_conformance.py: one OpenAI-compatible server as an `Endpoint` (requests
through the official openai client, each answer kept both parsed and as raw JSON, and cached: the guard-off
and guard-on tests ask the same questions), streamed answers folded into whole ones, and `sdk_shape`, the
JSON types of exactly the fields the openai SDK's pydantic models define."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from pydantic import BaseModel


@dataclass
class Reply:
    """A non-streamed answer: the client's parse and the body as sent."""
    parsed: Any
    raw: dict


@dataclass
class Streamed:
    """A streamed answer: the client's parse of every chunk and the raw JSON of every `data:` event."""
    chunks: list
    events: list[dict]


class Endpoint:
    """One server at `url`; model "base" and temperature 0 unless a request says otherwise."""

    def __init__(self, name: str, url: str, *, api_key: str = "none"):
        self.name, self.url = name, url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=300)
        self._cache: dict[str, Reply | Streamed] = {}

    def __repr__(self) -> str:
        return f"Endpoint({self.name})"

    @staticmethod
    def _body(kw: dict) -> dict:
        return {"model": "base", "temperature": 0, **kw}

    def _cached(self, kind: str, kw: dict, make):
        key = kind + json.dumps(kw, sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def chat(self, **kw) -> Reply:
        body = self._body(kw)

        def make():
            r = self.client.chat.completions.with_raw_response.create(**body)
            return Reply(r.parse(), r.http_response.json())
        return self._cached("chat", body, make)

    def chat_stream(self, **kw) -> Streamed:
        body = self._body({**kw, "stream": True})

        def make():
            r = self.client.chat.completions.with_raw_response.create(**body)
            raw = r.http_response.read()  # read whole first: the client's Stream then parses the same bytes
            return Streamed(list(r.parse()), sse_events(raw))
        return self._cached("chat_stream", body, make)

    def completion(self, **kw) -> Reply:
        body = self._body(kw)

        def make():
            r = self.client.completions.with_raw_response.create(**body)
            return Reply(r.parse(), r.http_response.json())
        return self._cached("completion", body, make)

    def completion_stream(self, **kw) -> Streamed:
        body = self._body({**kw, "stream": True})

        def make():
            r = self.client.completions.with_raw_response.create(**body)
            raw = r.http_response.read()
            return Streamed(list(r.parse()), sse_events(raw))
        return self._cached("completion_stream", body, make)

    def post(self, path: str, body: dict) -> httpx.Response:
        """A request the client would refuse to send, or whose error body is the point."""
        return httpx.post(f"{self.url}{path}", json=self._body(body), timeout=300)


def sse_events(raw: bytes) -> list[dict]:
    events = []
    for line in raw.decode("utf-8").splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: "):]))
    assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
    return events


def accumulate(events: list[dict]) -> dict[int, dict]:
    """Streamed chunks (raw JSON) folded per choice index into what a client ends up holding: the role,
    the content, the tool calls (per tool-call index: the id and type from their first delta, the name,
    the concatenated arguments), the finish reason and the logprob steps."""
    out: dict[int, dict] = {}
    for ev in events:
        for ch in ev.get("choices") or []:
            acc = out.setdefault(ch["index"], {"role": None, "content": None, "tool_calls": {},
                                               "finish_reason": None, "logprobs": []})
            delta = ch.get("delta") or {}
            if delta.get("role"):
                acc["role"] = delta["role"]
            if delta.get("content") is not None:
                acc["content"] = (acc["content"] or "") + delta["content"]
            for tc in delta.get("tool_calls") or []:
                call = acc["tool_calls"].setdefault(tc["index"], {"id": None, "type": None, "name": "",
                                                                  "arguments": ""})
                if tc.get("id") and call["id"] is None:
                    call["id"] = tc["id"]
                if tc.get("type") and call["type"] is None:
                    call["type"] = tc["type"]
                fn = tc.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
            if ch.get("finish_reason") is not None:
                acc["finish_reason"] = ch["finish_reason"]
            if ch.get("logprobs") is not None:
                acc["logprobs"] += ch["logprobs"].get("content") or []
    for acc in out.values():
        acc["tool_calls"] = [acc["tool_calls"][i] for i in sorted(acc["tool_calls"])]
    return out


def calls_of(message) -> list[tuple[str, str]]:
    """(name, arguments) of a parsed message's tool calls; ids are random on both servers."""
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


# --- field shapes ---------------------------------------------------------------------------------------

def _options(annotation) -> list:
    """The alternatives an annotation allows, with Optional, Union and Annotated unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _options(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [o for a in typing.get_args(annotation) for o in _options(a)]
    return [annotation]


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _shape(value, annotation):
    opts = _options(annotation)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        # an int where the SDK says float (a logprob of 0) is a number like any other
        return "integer" if isinstance(value, int) and float not in opts else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        items = [typing.get_args(o)[0] for o in opts if typing.get_origin(o) is list and typing.get_args(o)]
        item = typing.Union[tuple(items)] if items else Any
        shapes = {json.dumps(_shape(v, item), sort_keys=True) for v in value}
        return ["array", *(json.loads(s) for s in sorted(shapes))]
    if isinstance(value, dict):
        models = [o for o in opts if _is_model(o)]
        if not models:
            return "object"  # free-form (completions' top_logprobs: token -> logprob)
        # A discriminated union (a function or a custom tool call): the model that knows the most keys.
        best = max(models, key=lambda m: len(set(value) & {f.alias or n for n, f in m.model_fields.items()}))
        return sdk_shape(value, best)
    return type(value).__name__


def sdk_shape(obj: dict, model_cls: type[BaseModel]) -> dict:
    """The JSON type of every field of `obj` that `model_cls` (an openai SDK model) defines, recursively
    through nested SDK models; lists by the set of their items' shapes. Fields the SDK does not define
    (each server's own extras) are left out; an SDK field absent from `obj` is absent from the shape, so
    "absent" and null stay different."""
    out = {}
    for name, field in model_cls.model_fields.items():
        key = field.alias or name
        if key in obj:
            out[key] = _shape(obj[key], field.annotation)
    return out



def flat_shape(shape, path: str = "") -> dict[str, str]:
    """A shape as {path: JSON type}: 'choices[].message.refusal': 'null'; an empty list is 'array(empty)', a
    list whose items differ in shape lists each."""
    if isinstance(shape, dict):
        out = {path: "object"} if path else {}
        for k, v in shape.items():
            out |= flat_shape(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(shape, list):  # ["array", *item shapes]
        if len(shape) == 1:
            return {path: "array(empty)"}
        out = {path: "array"}
        for item in shape[1:]:
            for p, t in flat_shape(item, f"{path}[]").items():
                out[p] = t if out.get(p) in (None, t) else f"{out[p]}|{t}"
        return out
    return {path: shape}


def shape_diff(ours: dict, theirs: dict) -> list[str]:
    """Where two flat shapes differ, one line each, from `ours`' side."""
    lines = [f"missing {p} ({t})" for p, t in theirs.items() if p not in ours]
    lines += [f"extra {p} ({t})" for p, t in ours.items() if p not in theirs]
    lines += [f"{p}: {ours[p]}, not {theirs[p]}" for p in theirs if p in ours and ours[p] != theirs[p]]
    return lines
