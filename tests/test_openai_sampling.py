"""vLLM's sampling extensions (ignore_eos, top_k, min_p, repetition_penalty, min_tokens, skip_special_tokens)
on a real `guardtune serve` over vLLM, sent through the official openai client's extra_body; the same
fields on the transformers engine; and vLLM's own benchmark client run against the server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from bench.vllm_client import run_vllm_bench
from kernel.manifest import Manifest
from serving.engines.base import AdapterRef, GenParams
from serving.engines.hf_engine import TransformersEngine
from serving.prompts import PromptFormat, PromptRenderer
from tests.conftest import SALES_USER_KEY

USER_KEY = SALES_USER_KEY
Q = [{"role": "user", "content": "Can you tell me about your company?"}]
BASE = "smollm2-135m-instruct"
END = "<|im_end|>"


@pytest.fixture(scope="module")
def server(vllm_sales):
    return vllm_sales.get()  # the vLLM server test_serving also uses


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER_KEY, max_retries=0)


def chat(client, model="sales", **kw):
    return client.chat.completions.create(model=model, messages=Q, **kw)


def test_ignore_eos_runs_to_exactly_max_tokens(client):
    plain = chat(client, max_tokens=32, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 32  # the task ends early
    r = chat(client, max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 32
    assert r.choices[0].message.content.startswith(plain.choices[0].message.content)
    chunks = list(chat(client, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_min_tokens_holds_back_the_end_of_turn(client):
    plain = chat(client, max_tokens=48, temperature=0)
    n = plain.usage.completion_tokens
    r = chat(client, max_tokens=48, temperature=0, extra_body={"min_tokens": n + 6})
    assert r.usage.completion_tokens >= n + 6
    assert r.choices[0].message.content.startswith(plain.choices[0].message.content.rstrip())


def test_top_k_min_p_and_repetition_penalty_reach_the_sampler(client):
    greedy = chat(client, BASE, max_tokens=24, temperature=0).choices[0].message.content
    for narrow in ({"top_k": 1}, {"min_p": 1.0}):  # only the most likely token survives: greedy, whatever the seed
        for seed in (1, 2):
            r = chat(client, BASE, max_tokens=24, temperature=1.0, seed=seed, extra_body=narrow)
            assert r.choices[0].message.content == greedy, narrow
    sampled = chat(client, BASE, max_tokens=24, temperature=1.0, seed=5).choices[0].message.content
    off = chat(client, BASE, max_tokens=24, temperature=1.0, seed=5, extra_body={"top_k": -1})  # vLLM's "off"
    assert off.choices[0].message.content == sampled
    penalised = chat(client, BASE, max_tokens=24, temperature=0, extra_body={"repetition_penalty": 2.0})
    assert penalised.choices[0].message.content != greedy


def test_skip_special_tokens_false_shows_the_end_of_turn(client):
    kw = dict(max_tokens=40, temperature=0)
    shown = chat(client, **kw, extra_body={"ignore_eos": True, "skip_special_tokens": False}).choices[0]
    hidden = chat(client, **kw, extra_body={"ignore_eos": True}).choices[0]
    assert END in shown.message.content and END not in hidden.message.content


@pytest.mark.parametrize("extra, param, needle", [
    ({"frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
    ({"use_beam_search": True}, "use_beam_search", "unknown field"),  # vLLM's, but not served here
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"top_k": 1.5}, "top_k", "integer"),
    ({"top_k": "5"}, "top_k", "integer"),
    ({"top_k": 2**64}, "top_k", "less than or equal"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"min_p": -0.1}, "min_p", "greater than or equal to 0"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "greater than 0"),
    ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens", "min_tokens (9) must be at most max_tokens (8)"),
    ({"min_tokens": 65}, "min_tokens", "at most max_tokens (64)"),  # no max_tokens: the cap is the default
    ({"ignore_eos": "yes"}, "ignore_eos", "boolean"),
    ({"skip_special_tokens": 0}, "skip_special_tokens", "boolean"),
])
def test_bad_values_get_openai_400s(server, extra, param, needle):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "sales", "messages": Q, **extra},
                   headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and needle in err["message"], err


def test_non_finite_values_are_400s(server):
    h = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
    for field in ("min_p", "repetition_penalty"):
        body = f'{{"model": "sales", "messages": [{{"role": "user", "content": "x"}}], "{field}": NaN}}'
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_openai_client_gets_the_400_through_extra_body(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=4, extra_body={"min_p": 2.0})
    assert e.value.status_code == 400 and e.value.param == "min_p"


def test_extreme_valid_values_leave_the_engine_serving(server, client):
    for extra in ({"top_k": 2**63 - 1}, {"repetition_penalty": 5e-324}, {"repetition_penalty": 1e308},
                  {"min_p": 1.0, "top_k": 1, "min_tokens": 4, "ignore_eos": True}):
        r = chat(client, BASE, max_tokens=4, temperature=1.0, extra_body=extra)
        assert r.usage.completion_tokens == 4, extra
    assert httpx.get(f"{server.url}/ready").json()["ready"] is True


def test_vllm_benchmark_client_completes_with_no_failures(server, base_dir, tmp_path):
    n, out_len = 8, 16
    result = run_vllm_bench(server.url, "sales", base_dir, num_prompts=n, concurrency=4, input_len=32,
                            output_len=out_len, result_path=tmp_path / "vllm_bench.json", api_key=USER_KEY)
    assert result["failed"] == 0 and result["completed"] == n, result
    assert result["backend"] == "openai-chat" and result["model_id"] == "sales"
    assert result["total_output_tokens"] == n * out_len  # the client's ignore_eos is honoured
    assert result["output_throughput"] > 0 and result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0


# The transformers engine, in this process: the same fields through its own sampler.

@pytest.fixture(scope="module")
def hf(two_adapters, base_dir):
    _, adapters = two_adapters
    engine = TransformersEngine(None, base_dir)
    asyncio.run(engine.start())
    ref = AdapterRef("sales@1", 1, str(adapters["kestrel"]))
    asyncio.run(engine.load_adapter(ref))
    renderer = PromptRenderer(engine.tokenizer)
    fmt = PromptFormat.from_manifest(Manifest.read(ref.path))

    def run(**kw) -> tuple[str, int, str]:
        params = GenParams(stop_token_ids=renderer.stop_token_ids(fmt), **kw)
        return asyncio.run(_collect(engine.generate("t", renderer.render(fmt, Q), params, ref)))
    yield run
    asyncio.run(engine.shutdown())


async def _collect(deltas) -> tuple[str, int, str]:
    text, n, finish = "", 0, None
    async for d in deltas:
        text, n, finish = text + d.text, d.completion_tokens, d.finish_reason or finish
    return text, n, finish


def test_transformers_engine_maps_the_extensions(hf):
    plain, n, finish = hf(max_tokens=40, temperature=0)
    assert finish == "stop" and n < 32
    text, count, finish = hf(max_tokens=32, temperature=0, ignore_eos=True)
    assert (count, finish) == (32, "length") and text.startswith(plain) and END not in text
    shown, _, _ = hf(max_tokens=32, temperature=0, ignore_eos=True, skip_special_tokens=False)
    assert END in shown
    held, count, _ = hf(max_tokens=40, temperature=0, min_tokens=n + 6)
    assert count >= n + 6 and held.startswith(plain.rstrip())
    for narrow in ({"top_k": 1}, {"min_p": 1.0}):
        assert hf(max_tokens=12, temperature=1.0, seed=3, **narrow)[0] == hf(max_tokens=12, temperature=0)[0]
    assert hf(max_tokens=24, temperature=0, repetition_penalty=2.0)[0] != plain
    # Extreme but valid values sample something instead of failing on a NaN.
    for extreme in ({"repetition_penalty": 5e-324}, {"repetition_penalty": 1e308}, {"top_k": 2**63 - 1}):
        assert hf(max_tokens=4, temperature=1.0, seed=1, **extreme)[1] == 4, extreme
