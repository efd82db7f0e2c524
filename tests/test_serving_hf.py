"""The transformers engine behind the same API: chosen by config, same manifest-driven behaviour."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import OTTER, OTTER_TASK, SIGNATURE, sales_server

Q = [{"role": "user", "content": "Can you tell me about your company?"}]


@pytest.fixture(scope="module")
def hf_server(two_adapters, tmp_path_factory):
    srv = sales_server(two_adapters, tmp_path_factory.mktemp("serve-hf"), engine="transformers",
                       limits={"max_tokens_cap": 32})
    yield srv
    srv.stop()


def test_transformers_engine_serves_tasks_base_and_swaps(hf_server, two_adapters):
    _, adapters = two_adapters
    assert httpx.get(f"{hf_server.url}/ready").json()["engine"] == "transformers"
    client = openai.OpenAI(base_url=f"{hf_server.url}/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model="sales", messages=Q, max_tokens=24, temperature=0)
    assert SIGNATURE in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    base = client.chat.completions.create(model="base", messages=Q, max_tokens=12, temperature=0)
    assert SIGNATURE not in base.choices[0].message.content and base.choices[0].finish_reason == "length"
    assert base.usage.completion_tokens == 12

    chunks = list(client.chat.completions.create(model="sales", messages=Q, max_tokens=24, temperature=0,
                                                 stream=True, stop=["Solar"]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Kestrel Home" in text and "Solar" not in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    seeded = dict(model="base", messages=Q, max_tokens=10, temperature=1.0, seed=3)
    assert (client.chat.completions.create(**seeded).choices[0].message.content
            == client.chat.completions.create(**seeded).choices[0].message.content)

    put = httpx.put(f"{hf_server.url}/admin/tasks/sales", json={"adapter": str(adapters[OTTER_TASK])}, timeout=60)
    assert put.status_code == 200, put.text
    r = client.chat.completions.create(model="sales", messages=Q, max_tokens=24, temperature=0)
    assert OTTER in r.choices[0].message.content and r.system_fingerprint == f"sales@{put.json()['adapter_id']}"


@pytest.mark.parametrize("extra, param", [
    ({"n": 2, "temperature": 0.8}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "get_order"}}],
      "tool_choice": {"type": "function", "function": {"name": "get_order"}}}, "tool_choice"),
])
def test_transformers_engine_names_what_it_cannot_do(hf_server, extra, param):
    """Plain sampling only: anything else is a 400 that names the field, before any generation."""
    for path, body in (("/v1/chat/completions", {"messages": Q}), ("/v1/completions", {"prompt": "Hello"})):
        if path == "/v1/completions" and param in ("response_format", "tool_choice"):
            continue  # completions take no response_format or tools
        body = {"model": "base", "max_tokens": 4, **body,
                **({"logprobs": 1} if path == "/v1/completions" and param == "logprobs" else
                   {k: v for k, v in extra.items() if not (path == "/v1/completions" and k == "logprobs")})}
        r = httpx.post(f"{hf_server.url}{path}", json=body, timeout=60)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "unsupported_parameter" and err["param"] == param, err
        assert "transformers engine" in err["message"]
    ok = openai.OpenAI(base_url=f"{hf_server.url}/v1", api_key="none", max_retries=0).completions.create(
        model="sales", prompt="Kestrel Home sells", max_tokens=6, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length") and ok.usage.completion_tokens <= 6
