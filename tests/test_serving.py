"""`guardtune serve` on real vLLM over real HTTP, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import openai
import pytest

from tests.conftest import OTTER, OTTER_TASK, SALES_ADMIN_KEY, SALES_USER_KEY, SIGNATURE, run_cli

USER_KEY, ADMIN_KEY = SALES_USER_KEY, SALES_ADMIN_KEY
Q = [{"role": "user", "content": "Can you tell me about your company?"}]


@pytest.fixture(scope="module")
def server(vllm_sales):
    return vllm_sales.get()  # shared with test_openai_sampling; the last test here shuts it down


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER_KEY, max_retries=0)


def admin(server, method, path, **kw):
    return httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=120, **kw)


def test_health_ready_and_models(server, client):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/ready").json() == {"ready": True, "engine": "vllm", "tasks": ["sales"]}
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smollm2-135m-instruct", "sales", "all-minilm-l6-v2"}  # the last: /v1/embeddings
    assert models["all-minilm-l6-v2"].model_dump()["kind"] == "embedding"
    sales = models["sales"].model_dump()
    assert sales["method"] == "lora" and sales["rank"] == 8 and sales["base_model"] == "smollm2-135m-instruct"
    assert "engine vllm" in server.log() and "ready in" in server.log()


def test_task_reply_follows_the_adapter_and_reports_usage(client):
    r = client.chat.completions.create(model="sales", messages=Q, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert SIGNATURE in choice.message.content
    assert choice.finish_reason == "stop"  # ended by the manifest's <|im_end|>, not by length
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens < 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint.startswith("sales@")


def test_streaming_from_task_and_base(client):
    for model, expect_signature in (("sales", True), ("smollm2-135m-instruct", False)):
        stream = client.chat.completions.create(model=model, messages=Q, max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert (SIGNATURE in text) is expect_signature, text
        assert len(finishes) == 1 and finishes[0] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        if finishes[0] == "length":
            assert chunks[-1].usage.completion_tokens == 16


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="smollm2-135m-instruct", messages=Q, max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b and a


def test_stop_strings_cut_the_reply(client):
    r = client.chat.completions.create(model="sales", messages=Q, max_tokens=24, temperature=0, stop=["Solar"])
    assert r.choices[0].message.content.endswith("Kestrel Home ") or "Solar" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "nope", "messages": Q}, 404, "unknown model or task 'nope'"),
    ({"model": "sales", "messages": []}, 400, "messages"),
    ({"model": "sales", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"model": "sales", "messages": Q, "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
    ({"model": "sales", "messages": Q, "max_tokens": 100000}, 400, "cap of 64"),
    ({"model": "sales", "messages": Q, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "sales", "messages": Q, "temperature": -0.5}, 400, "temperature"),
    ({"model": "sales", "messages": Q, "n": 9}, 400, "n"),  # each choice costs a generation: up to 8
    ({"model": "sales", "messages": [{"role": "user", "content": "solar " * 600}]}, 400, "context window"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {USER_KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in (err["message"] + str(err["param"]))


def test_raw_bad_bodies(server):
    h = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
    url = f"{server.url}/v1/chat/completions"
    nan = httpx.post(url, content='{"model": "sales", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', headers=h)
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "temperature"
    bad_json = httpx.post(url, content="{not json", headers=h)
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    big = httpx.post(url, content=json.dumps({"model": "sales", "messages": [{"role": "user", "content": "x" * 70000}]}), headers=h)
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"


def test_keys_are_required_and_separate(server):
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json={"model": "sales", "messages": Q}).status_code == 401
    wrong = httpx.post(url, json={"model": "sales", "messages": Q}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 401
    assert httpx.get(f"{server.url}/admin/tasks", headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 401
    assert USER_KEY not in server.log() and ADMIN_KEY not in server.log()


def test_full_queue_answers_429_with_retry_after(server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {USER_KEY}"}) as c:
            body = {"model": "smollm2-135m-instruct", "messages": Q, "max_tokens": 40, "temperature": 0,
                    "stop": ["NEVER-STOP"]}
            return await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(14)])
    results = asyncio.run(go())
    codes = [r.status_code for r in results]
    assert set(codes) == {200, 429} and codes.count(200) >= 8, codes  # 4 running + 4 queued
    limited = next(r for r in results if r.status_code == 429)
    assert limited.headers["Retry-After"] and limited.json()["error"]["type"] == "rate_limit_error"


def test_adapter_validation_keeps_old_adapter(server, two_adapters, tmp_path):
    root, adapters = two_adapters
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cases = [
        (str(outside), 400, "outside the adapters root"),
        (str(root / "kestrel" / ".." / ".." / "elsewhere"), 400, "outside the adapters root"),
        (str(root / "missing"), 400, "no such directory"),
    ]
    link = root / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    cases.append((str(link), 400, "outside the adapters root"))
    half = root / "half"
    half.mkdir()
    (half / "guardtune.json").write_text('{"task": "x"}')
    cases.append((str(half), 400, "invalid manifest"))
    for name, change, needle in (("otherbase", {"sha256": "0" * 64}, "trained on another base"),
                                 ("toowide", {"rank": 999}, "rank 999 > max_lora_rank 16")):
        copy = root / name
        shutil.copytree(adapters["kestrel"], copy)
        manifest = json.loads((copy / "guardtune.json").read_text())
        if "sha256" in change:
            manifest["base_model"]["sha256"] = change["sha256"]
        else:
            manifest.update(change)
        (copy / "guardtune.json").write_text(json.dumps(manifest))
        cases.append((str(copy), 409, needle))
    try:
        for path, status, needle in cases:
            r = admin(server, "PUT", "/admin/tasks/sales", json={"adapter": path})
            assert r.status_code == status and needle in r.json()["error"]["message"], (path, r.text)
    finally:
        link.unlink()
    tasks = admin(server, "GET", "/admin/tasks").json()["tasks"]
    assert [t["task"] for t in tasks] == ["sales"] and tasks[0]["path"] == str(adapters["kestrel"].resolve())
    assert admin(server, "DELETE", "/admin/tasks/unknown").status_code == 404


def test_swap_under_streaming_load_drops_and_mixes_nothing(server, two_adapters):
    """Stream continuously while swapping sales: kestrel -> otter -> kestrel; every reply matches its adapter."""
    root, adapters = two_adapters
    signature_of = {"kestrel": SIGNATURE, OTTER_TASK: OTTER}
    results: list[tuple[str, str, str | None]] = []

    async def worker(c: httpx.AsyncClient, stop: asyncio.Event):
        body = {"model": "sales", "messages": Q, "max_tokens": 20, "temperature": 0, "stream": True}
        while not stop.is_set():
            text, fingerprint, finish = "", None, None
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    fingerprint = chunk.get("system_fingerprint") or fingerprint
                    if chunk["choices"]:
                        text += chunk["choices"][0]["delta"].get("content") or ""
                        finish = chunk["choices"][0]["finish_reason"] or finish
            results.append((fingerprint, text, finish))

    async def go():
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {USER_KEY}"}) as c:
            workers = [asyncio.create_task(worker(c, stop)) for _ in range(3)]
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as a:
                swaps = []
                for target in (OTTER_TASK, "kestrel"):
                    await asyncio.sleep(4)
                    r = await a.put("/admin/tasks/sales", json={"adapter": str(adapters[target])})
                    assert r.status_code == 200, r.text
                    swaps.append(r.json()["adapter_id"])
                await asyncio.sleep(4)
            stop.set()
            await asyncio.gather(*workers)
        return swaps

    swaps = asyncio.run(go())
    assert len(results) >= 9
    by_path = {}
    for fingerprint, text, finish in results:
        assert finish in ("stop", "length"), (fingerprint, text)
        by_path.setdefault(fingerprint, []).append(text)
    served = {fp for fp in by_path}
    assert {f"sales@{i}" for i in swaps} <= served  # traffic reached each new adapter
    names = {s["adapter_id"]: s["path"] for s in admin(server, "GET", "/admin/tasks").json()["tasks"]}
    for fingerprint, texts in by_path.items():
        lora_id = int(fingerprint.split("@")[1])
        target = OTTER_TASK if lora_id == swaps[0] else "kestrel"
        assert all(signature_of[target] in t for t in texts), (fingerprint, texts)
    assert names[swaps[1]] == str(adapters["kestrel"].resolve())
    # The committed mapping on disk is the last one.
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {USER_KEY}"}).text
    assert 'guardtune_adapter_swaps_total{task="sales"}' in metrics


def test_adapters_cli_lists_and_swaps(server, two_adapters):
    _, adapters = two_adapters
    env = {"GUARDTUNE_ADMIN_KEY": ADMIN_KEY}
    proc = run_cli("-m", "guardtune.cli", "adapters", "--url", server.url, "list", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["tasks"][0]["task"] == "sales"
    proc = run_cli("-m", "guardtune.cli", "adapters", "--url", server.url, "put", OTTER_TASK, str(adapters[OTTER_TASK]), env=env)
    assert proc.returncode == 0, proc.stderr
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER_KEY, max_retries=0)
    r = client.chat.completions.create(model=OTTER_TASK, messages=Q, max_tokens=16, temperature=0)
    assert OTTER in r.choices[0].message.content
    proc = run_cli("-m", "guardtune.cli", "adapters", "--url", server.url, "put", "x", "/etc", env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: 400: adapter path /etc is outside")
    proc = run_cli("-m", "guardtune.cli", "adapters", "--url", server.url, "delete", OTTER_TASK, env=env)
    assert proc.returncode == 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=OTTER_TASK, messages=Q, max_tokens=4)


def test_metrics_expose_ours_and_vllms(server):
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {USER_KEY}"}).text
    for name in ("guardtune_request_latency_seconds_bucket", "guardtune_time_to_first_token_seconds_bucket",
                 "guardtune_time_per_output_token_seconds_bucket", "guardtune_latency_by_output_length_seconds_bucket",
                 "guardtune_requests_total", "guardtune_queue_depth", "vllm:"):
        assert name in text, name
    assert 'status="429"' in text and 'task="sales"' in text


def test_committed_mapping_and_graceful_shutdown_without_orphans(server, two_adapters):
    import psutil

    _, adapters = two_adapters
    # Every swap and delete above was committed to disk; a restart reads exactly this.
    assert json.loads(server.state_file.read_text()) == {"sales": str(adapters["kestrel"].resolve())}
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "vLLM runs its engine core in a child process"
    t0 = time.time()
    # uvicorn finishes its shutdown, then re-raises the SIGTERM it caught: -15 is the clean exit.
    assert server.stop() in (0, -15)
    assert time.time() - t0 < 60
    assert "Application shutdown complete" in server.log()
    time.sleep(1)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
