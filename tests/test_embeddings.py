"""POST /v1/embeddings on a real `guardtune serve` over real HTTP: the official openai client against
sentence-transformers' own vectors, parity with vLLM's own OpenAI server embedding the same MiniLM
directory (field set, token counts, vectors, base64), OpenAI-shaped errors, and a configured encoder."""

from __future__ import annotations

import base64
import time

import httpx
import numpy as np
import openai
import pytest

from bench.raw_vllm import RawVLLMServer
from kernel.encoder import MODEL_ID, model_dir
from tests.conftest import Server

USER_KEY = "embed-user-key"
MAX_CHARS = 20000
TEXTS = ["Do you install batteries?", "Solar panels still work in winter, at a lower output.", "Hello",
         "Ünïcödé façade — 太阳能电池板 🌞", "Kestrel Home Solar " * 30]
LONG = "Our installers fit solar panels and batteries on most roofs in two days. " * 200  # ~14,600 chars


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    d = model_dir()
    return SentenceTransformer(str(d), device="cpu"), AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The transformers engine starts in seconds; the encoder does not use the engine.
    tmp = tmp_path_factory.mktemp("embeddings")
    (tmp / "adapters").mkdir()
    srv = Server({"engine": "transformers", "adapters_root": str(tmp / "adapters"), "state_file": str(tmp / "state.json"),
                  "api_keys": [USER_KEY], "max_model_len": 256, "embeddings": {"mini-copy": str(model_dir())},
                  "limits": {"max_tokens_cap": 4, "max_input_chars": MAX_CHARS}}, tmp)
    yield srv
    assert "Traceback" not in srv.log(), srv.log()[-3000:]
    srv.stop()


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """vLLM's own OpenAI server, embedding the packaged MiniLM directory (a BertModel, pooled as its
    sentence-transformers config says: mean, then normalised)."""
    args = ["--model", str(model_dir()), "--served-model-name", MODEL_ID, "--runner", "pooling",
            "--convert", "embed", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8",
            "--seed", "0"]
    t0 = time.time()
    srv = RawVLLMServer(args, tmp_path_factory.mktemp("vllm-embed") / "vllm.log", kv_cache_gb=1, ready_timeout=600)
    srv.start_s = time.time() - t0
    print(f"\nvLLM's embedding server ready in {srv.start_s:.1f} s")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER_KEY, max_retries=0)


def post(url: str, body: dict, key: str | None = USER_KEY) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {key}"} if key else {})


def vectors(body: dict) -> np.ndarray:
    rows = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    if isinstance(rows[0], str):
        return np.stack([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows])
    return np.asarray(rows, dtype=np.float32)


def keyset(body: dict) -> tuple:
    return set(body), set(body["data"][0]), set(body["usage"])


def test_openai_client_gets_sentence_transformers_vectors(client, minilm):
    model, tok = minilm
    texts = [*TEXTS, LONG]
    r = client.embeddings.create(model=MODEL_ID, input=texts)  # the client asks for base64 and decodes it
    got = np.asarray([d.embedding for d in r.data], dtype=np.float32)
    assert r.model == MODEL_ID and r.object == "list" and [d.index for d in r.data] == list(range(len(texts)))
    assert got.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # The long text is cut before tokenizing; MiniLM reads its first 256 tokens either way.
    want = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    cosines = np.sum(got * want, axis=1)
    assert cosines.min() > 0.9999, cosines
    lengths = [min(len(ids), 256) for ids in tok(texts)["input_ids"]]  # special tokens included, as vLLM counts
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(lengths)

    floats = client.embeddings.create(model=MODEL_ID, input=texts, encoding_format="float")
    assert np.array_equal(np.asarray([d.embedding for d in floats.data], dtype=np.float32), got)  # bit for bit

    one = client.embeddings.create(model=MODEL_ID, input="Hello")
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, got[2], atol=1e-6)


def test_hostile_texts_cost_a_bounded_tokenization(server):
    hostile = ["a" * MAX_CHARS, " " * (MAX_CHARS - 1) + "x", "🌞" * MAX_CHARS, "ab " * (MAX_CHARS // 3)]
    t0 = time.time()
    r = post(server.url, {"model": MODEL_ID, "input": hostile})
    assert r.status_code == 200, r.text
    assert time.time() - t0 < 60
    body = r.json()
    assert len(body["data"]) == 4 and body["usage"]["prompt_tokens"] <= 4 * 256


def test_parity_with_vllms_own_server(server, vllm_server, minilm):
    _, tok = minilm
    print(f"vLLM's embedding server started in {vllm_server.start_s:.1f} s")
    ids = [tok(t)["input_ids"] for t in TEXTS[:3]]
    for body in ({"model": MODEL_ID, "input": TEXTS}, {"model": MODEL_ID, "input": TEXTS[1]},
                 {"model": MODEL_ID, "input": ids}, {"model": MODEL_ID, "input": ids[0]}):
        ours, theirs = post(server.url, body), post(vllm_server.url, body)
        assert ours.status_code == theirs.status_code == 200, (ours.text[:300], theirs.text[:300])
        a, b = ours.json(), theirs.json()
        assert keyset(a) == keyset(b), (keyset(a), keyset(b))
        assert a["usage"] == b["usage"]  # prompt_tokens, total_tokens, completion_tokens 0, details null
        assert a["object"] == b["object"] == "list" and a["model"] == b["model"] == MODEL_ID
        assert a["id"].startswith("embd-") and b["id"].startswith("embd-")
        assert [d["index"] for d in a["data"]] == [d["index"] for d in b["data"]]
        assert {d["object"] for d in a["data"] + b["data"]} == {"embedding"}
        cosines = np.sum(vectors(a) * vectors(b), axis=1)
        print(f"input {str(body['input'])[:40]!r}: cosine with vLLM min {cosines.min():.7f}, "
              f"prompt_tokens {a['usage']['prompt_tokens']}")
        assert cosines.min() > 0.999, cosines

        # base64 is the same floats, on both servers
        ours64, theirs64 = (post(url, {**body, "encoding_format": "base64"}).json()
                            for url in (server.url, vllm_server.url))
        assert keyset(ours64) == keyset(theirs64)
        assert np.array_equal(vectors(ours64), vectors(a))
        assert np.allclose(vectors(theirs64), vectors(b), atol=1e-6)

    # dimensions on a model that is not Matryoshka: refused by both, in the same words
    body = {"model": MODEL_ID, "input": "Hello", "dimensions": 128}
    ours, theirs = post(server.url, body), post(vllm_server.url, body)
    assert ours.status_code == theirs.status_code == 400
    assert ours.json()["error"]["message"] == theirs.json()["error"]["message"]
    assert post(vllm_server.url, {"model": "nope", "input": "x"}).status_code == 404


@pytest.mark.parametrize("body, status, param, needle", [
    ({"model": MODEL_ID, "input": ""}, 400, "input", "input cannot be an empty string"),
    ({"model": MODEL_ID, "input": ["Hello", ""]}, 400, "input", "input cannot be an empty string"),
    ({"model": MODEL_ID, "input": []}, 400, "input", "empty list"),
    ({"model": MODEL_ID, "input": [[]]}, 400, "input", "empty list of token ids"),
    ({"model": MODEL_ID, "input": ["a"] * 2049}, 400, "input", "up to 2048"),
    ({"model": MODEL_ID, "input": "x" * (MAX_CHARS + 1)}, 400, "input", f"up to {MAX_CHARS}"),
    ({"model": MODEL_ID, "input": [101] * 257}, 400, "input", "reads up to 256"),
    ({"model": MODEL_ID, "input": [[101, 30522, 102]]}, 400, "input", "out of vocabulary"),
    ({"model": MODEL_ID, "input": [True, 1]}, 400, "input", "token ids"),
    ({"model": MODEL_ID, "input": {"text": "Hello"}}, 400, "input", "a list of strings"),
    ({"model": "text-embedding-3-small", "input": "Hello"}, 404, "model", "all-minilm-l6-v2, mini-copy"),
    ({"model": MODEL_ID, "input": "Hello", "dimensions": 384}, 400, "dimensions", "does not support Matryoshka"),
    ({"model": MODEL_ID, "input": "Hello", "dimensions": "8"}, 400, "dimensions", "integer"),
    ({"model": MODEL_ID, "input": "Hello", "encoding_format": "bytes"}, 400, "encoding_format", "'base64'"),
    ({"model": MODEL_ID, "input": "Hello", "truncate_prompt_tokens": 8}, 400, "truncate_prompt_tokens", "unknown"),
    ({"input": "Hello"}, 400, "model", "Field required"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, needle):
    r = post(server.url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["param"] == param and needle in err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_a_key_is_required(server):
    assert post(server.url, {"model": MODEL_ID, "input": "Hello"}, key=None).status_code == 401
    assert post(server.url, {"model": MODEL_ID, "input": "Hello"}, key="wrong").status_code == 401


def test_a_configured_encoder_is_served_and_listed(server, client):
    models = {m.id: m.model_dump() for m in client.models.list().data}
    for m in (MODEL_ID, "mini-copy"):
        assert models[m]["kind"] == "embedding" and models[m]["owned_by"] == "guardtune", models
    assert "path" not in models["mini-copy"] and str(model_dir()) not in str(models)
    copy = client.embeddings.create(model="mini-copy", input=TEXTS)
    packaged = client.embeddings.create(model=MODEL_ID, input=TEXTS)
    assert copy.model == "mini-copy" and copy.usage.prompt_tokens == packaged.usage.prompt_tokens
    a, b = (np.asarray([d.embedding for d in r.data]) for r in (copy, packaged))
    assert np.sum(a * b, axis=1).min() > 0.99999
