"""Hostile input against a real `guardtune serve` over real HTTP: every case is a clean 4xx in OpenAI's
error shape (or, below HTTP, a refused connection), and the server keeps answering afterwards.

Cases already in tests/test_serving.py (unknown fields, empty messages, bad roles, n>1, a body over the
cap with Content-Length, bad JSON, NaN temperature) are not repeated here.
"""

from __future__ import annotations

import json
import math
import socket
import time

import httpx
import pytest

from tests.conftest import Server

USER_KEY, ADMIN_KEY = "hostile-user-key", "hostile-admin-key"
CAP = 256 * 1024
Q = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "adapters").mkdir()
    (tmp / "outside").mkdir()
    srv = Server({"engine": "transformers", "adapters_root": str(tmp / "adapters"), "state_file": str(tmp / "state.json"),
                  "api_keys": [USER_KEY], "admin_key": ADMIN_KEY, "max_model_len": 256,
                  "limits": {"max_tokens_cap": 8, "max_body_bytes": CAP}}, tmp)
    srv.tmp = tmp
    yield srv
    assert "Traceback" not in srv.log(), srv.log()[-3000:]
    srv.stop()


def post(server, body: bytes | str | dict, *, path="/v1/chat/completions", key=USER_KEY,
         content_type="application/json", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type, **kw.pop("headers", {})}
    content = json.dumps(body) if isinstance(body, dict) else body
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60, **kw)


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def raw_request(server, data: bytes, *, read_timeout: float = 10) -> bytes:
    """Send bytes as they are (no client-side framing or checks) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking it all
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def json_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def assert_alive(server):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


# --- oversized bodies ------------------------------------------------------------------------------

def test_oversized_body_with_content_length_is_413_before_reading_it(server):
    big = json.dumps({"model": "base", "messages": [{"role": "user", "content": "x" * CAP}]})
    err = openai_error(post(server, big), 413)
    assert err["code"] == "body_too_large" and str(CAP) in err["message"]
    # A Content-Length that claims a gigabyte is refused from the header alone.
    raw = raw_request(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + USER_KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{")
    assert status_of(raw) == 413 and json_of(raw)["error"]["code"] == "body_too_large"


def test_oversized_chunked_body_without_content_length_is_413(server):
    def chunks():
        for _ in range(CAP // 8192 + 4):
            yield b"x" * 8192
    r = None
    try:
        r = post(server, chunks())
    except httpx.HTTPError:  # the server may close while the client is still sending; check on a raw socket
        pass
    if r is not None:
        assert "transfer-encoding" not in r.request.headers or r.request.headers["transfer-encoding"] == "chunked"
        openai_error(r, 413)
    body = b"".join(b"%x\r\n%s\r\n" % (8192, b"y" * 8192) for _ in range(CAP // 8192 + 4)) + b"0\r\n\r\n"
    raw = raw_request(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + USER_KEY.encode() + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + body)
    assert status_of(raw) == 413 and json_of(raw)["error"]["code"] == "body_too_large"
    assert_alive(server)


# --- malformed JSON ----------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_400_not_a_recursion_crash(server, depth):
    arrays = '{"model": "base", "messages": ' + "[" * depth + "]" * depth + "}"
    openai_error(post(server, arrays), 400)
    objects = ('{"model": "base", "messages": [{"role": "user", "content": "hi"}], "metadata": '
               + '{"a": ' * (depth // 4) + "1" + "}" * (depth // 4) + "}")
    openai_error(post(server, objects), 400)
    assert_alive(server)


@pytest.mark.parametrize("body", [
    b'{"model": "base", "messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}]}',  # latin-1, invalid UTF-8
    b'\xef\xbb\xbf{"model": "base"}',  # a BOM
    b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate escape
    b"", b"null", b"[]", b'"text"', b"{" * 3,
])
def test_bytes_that_are_not_a_json_object_are_400(server, body):
    err = openai_error(post(server, body), 400)
    assert err["type"] == "invalid_request_error"


# --- sampling values and limits ---------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", 10**30), ("max_tokens", 2**63), ("max_completion_tokens", 10**12), ("max_tokens", 0),
    ("max_tokens", 1.5), ("max_tokens", "8"), ("max_tokens", 8.0), ("temperature", -1e-9), ("temperature", 2.0001),
    ("temperature", 1e308), ("top_p", 0), ("top_p", 5e-324), ("top_p", -1), ("top_p", 1.5), ("seed", -1), ("seed", 2**64),
    ("n", 0), ("stop", [""]), ("stop", ["a"] * 5), ("stream", "yes"), ("stream", 1), ("seed", "1"),
    ("stream_options", {"include_usage": 0}), ("temperature", False), ("top_p", "0.5"),
])
def test_out_of_range_values_are_400_naming_the_field(server, field, value):
    err = openai_error(post(server, {"model": "base", "messages": Q, field: value}), 400)
    named = "max_tokens" if field == "max_completion_tokens" else field  # the cap speaks of max_tokens
    assert named in (err["message"] + str(err["param"])), err


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_in_raw_json_are_400(server, field, literal):
    body = '{"model": "base", "messages": [{"role": "user", "content": "x"}], "%s": %s}' % (field, literal)
    err = openai_error(post(server, body), 400)
    assert err["param"] == field


def test_max_tokens_at_the_cap_still_generates(server):
    r = post(server, {"model": "base", "messages": Q, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize("model", ["nope", "../../etc/passwd", "base ", "BASE", "sales\x00", "タスク", "x" * 128])
def test_unknown_models_are_404_or_400(server, model):
    r = post(server, {"model": model, "messages": Q})
    err = openai_error(r, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_model_name_over_the_limit_is_400(server):
    err = openai_error(post(server, {"model": "x" * 129, "messages": Q}), 400)
    assert err["param"] == "model"


# --- adapter paths on PUT /admin/tasks ---------------------------------------------------------------

def test_adapter_paths_outside_the_root_are_refused(server):
    root, outside = server.tmp / "adapters", server.tmp / "outside"
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    (root / "passwd").symlink_to("/etc/passwd")
    cases = {
        "../outside": "outside the adapters root",
        "../../../../../../etc": "outside the adapters root",
        str(root / ".." / "outside"): "outside the adapters root",
        "/etc": "outside the adapters root",
        str(outside): "outside the adapters root",
        "escape": "outside the adapters root",
        "escape/../../outside": "outside the adapters root",
        "passwd": "outside the adapters root",
        "loop": "unusable",
        "bad\x00byte": "adapter",
        "a" * 4000: "unusable",
        "/" + "b/" * 2000: "outside the adapters root",
        ".": "adapter",  # the root itself is no adapter
        "~": "no such directory",
    }
    h = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for path, needle in cases.items():
        r = httpx.put(f"{server.url}/admin/tasks/sales", json={"adapter": path}, headers=h, timeout=60)
        err = openai_error(r, 400)
        assert needle in err["message"] + str(err["param"]), (path[:80], err)
    assert httpx.get(f"{server.url}/admin/tasks", headers=h).json()["tasks"] == []  # nothing was loaded
    assert not (server.tmp / "state.json").exists()  # nothing was committed


@pytest.mark.parametrize("task", ["..", "a/b", "a%2Fb", "../../x", "x" * 65, "base", "smollm2-135m-instruct", "t x"])
def test_bad_task_names_are_refused(server, task):
    r = httpx.put(f"{server.url}/admin/tasks/{task}", json={"adapter": "x"},
                  headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert r.status_code in (400, 404, 405), r.text
    openai_error(r, r.status_code)


# --- headers and content types ---------------------------------------------------------------------

def test_header_floods_are_refused_below_http_or_with_a_4xx(server):
    auth = b"Authorization: Bearer " + USER_KEY.encode() + b"\r\n"
    many = b"".join(b"X-Flood-%d: %s\r\n" % (i, b"v" * 20) for i in range(20_000))
    huge = b"X-Huge: " + b"h" * 2_000_000 + b"\r\n"
    for headers in (many, huge):
        t0 = time.time()
        try:
            raw = raw_request(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + headers + b"\r\n")
        except (ConnectionError, socket.timeout):
            raw = b""
        status = status_of(raw)
        assert status == 0 or 400 <= status < 500, raw[:300]
        assert time.time() - t0 < 10
        assert_alive(server)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/xml", "", "application/json; charset=latin-1"])
def test_wrong_content_types_are_400(server, content_type):
    body = json.dumps({"model": "base", "messages": Q, "max_tokens": 1}) if "json" not in content_type else "x=1"
    err = openai_error(post(server, body, content_type=content_type), 400)
    assert err["type"] == "invalid_request_error"


def test_errors_never_echo_back_a_huge_input(server):
    err = openai_error(post(server, {"model": "base", "messages": [{"role": "wizard" * 20_000, "content": "x"}]}), 400)
    assert len(json.dumps(err)) < 2000


def test_still_serving_after_all_of_it(server):
    r = post(server, {"model": "base", "messages": Q, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert math.isfinite(r.json()["created"])
