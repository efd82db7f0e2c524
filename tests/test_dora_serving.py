"""DoRA served over HTTP by the default (vLLM) server: vLLM refuses DoRA, so the manifest routes it to
the transformers engine, which the server starts beside vLLM the first time it is needed."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time

import httpx
import openai
import pytest

from tests.conftest import SIGNATURE, Server, tiny_config, tiny_rows, write_jsonl

HERON = "Heron Windows"
Q = [{"role": "user", "content": "Can you tell me about your company?"}]


@pytest.fixture(scope="module")
def dora_adapter(two_adapters, tmp_path_factory):
    """A real DoRA adapter (peft use_dora) under two_adapters' root, trained to greet as Heron Windows."""
    from training.config import validate
    from training.entry import train

    root, _ = two_adapters
    tmp = tmp_path_factory.mktemp("dora")
    data = write_jsonl(tmp / "heron.jsonl", tiny_rows(HERON))
    cfg = tiny_config(tmp, data, task="heron", method="dora", output_dir=str(root / "heron"),
                      run_dir=str(tmp / "runs"), max_steps=12, eval_split=0.0)
    return train(validate(cfg), log=lambda m: None)


@pytest.fixture(scope="module")
def server(two_adapters, dora_adapter, tmp_path_factory):
    root, adapters = two_adapters
    tmp = tmp_path_factory.mktemp("serve-dora")
    srv = Server({"engine": "vllm", "adapters_root": str(root), "state_file": str(tmp / "state.json"),
                  "tasks": {"sales": str(adapters["kestrel"]), "heron": str(dora_adapter)},
                  "max_model_len": 512, "max_lora_rank": 16, "kv_cache_gb": 1,
                  "limits": {"max_tokens_cap": 64, "max_concurrency": 1, "queue_timeout_s": 4}}, tmp)
    yield srv
    srv.stop()


def test_dora_task_is_served_beside_lora_on_a_vllm_server(server):
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(server_task_path(server, "heron"))).use_dora
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    assert httpx.get(f"{server.url}/ready").json()["engine"] == "vllm"
    heron = client.chat.completions.create(model="heron", messages=Q, max_tokens=24, temperature=0)
    sales = client.chat.completions.create(model="sales", messages=Q, max_tokens=24, temperature=0)
    base = client.chat.completions.create(model="base", messages=Q, max_tokens=12, temperature=0)
    assert HERON in heron.choices[0].message.content and SIGNATURE not in heron.choices[0].message.content
    assert SIGNATURE in sales.choices[0].message.content
    assert HERON not in base.choices[0].message.content and SIGNATURE not in base.choices[0].message.content
    chunks = list(client.chat.completions.create(model="heron", messages=Q, max_tokens=24, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == heron.choices[0].message.content
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert models["heron"]["method"] == "dora" and models["sales"]["method"] == "lora"
    assert "transformers engine" in server.log()


def test_a_long_dora_request_does_not_hold_vllms_slots(server):
    """The transformers engine decodes one request at a time, in a queue of its own: with one vLLM slot
    and a 4 s queue timeout, a LoRA request is served while a DoRA request generates 64 tokens (over 10 s here)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(client.chat.completions.create, model="heron", messages=Q, max_tokens=64,
                           temperature=0, extra_body={"ignore_eos": True})
        time.sleep(1.0)  # admitted and decoding: 64 DoRA tokens take over 10 s on the transformers engine
        t0 = time.time()
        sales = client.chat.completions.create(model="sales", messages=Q, max_tokens=8, temperature=0)
        waited = time.time() - t0
        assert not long.done(), "the DoRA request should still be generating"
        assert long.result().usage.completion_tokens == 64
    assert sales.usage.completion_tokens == 8 and waited < 4


def test_dora_task_swaps_and_deletes_like_any_task(server, two_adapters):
    _, adapters = two_adapters
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    put = httpx.put(f"{server.url}/admin/tasks/heron", json={"adapter": str(adapters["kestrel"])}, timeout=120)
    assert put.status_code == 200, put.text
    r = client.chat.completions.create(model="heron", messages=Q, max_tokens=24, temperature=0)
    assert SIGNATURE in r.choices[0].message.content  # now a LoRA task, on vLLM
    assert httpx.delete(f"{server.url}/admin/tasks/heron", timeout=60).status_code == 200


def test_an_old_dora_manifest_is_routed_to_transformers(dora_adapter, tmp_path):
    from kernel.manifest import Manifest

    old = shutil.copytree(dora_adapter, tmp_path / "old")
    raw = json.loads((old / "guardtune.json").read_text())
    raw["serve_with"] = "vllm"  # what manifests said before vLLM's refusal was known
    (old / "guardtune.json").write_text(json.dumps(raw))
    assert Manifest.read(old).serve_with == "transformers"


def server_task_path(server, task: str):
    tasks = httpx.get(f"{server.url}/admin/tasks", timeout=30).json()["tasks"]
    return next(t["path"] for t in tasks if t["task"] == task)
