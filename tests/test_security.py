"""Security of a real `guardtune serve` over real HTTP: keys on every /v1 and /admin route (enumerated
from the app itself), user and admin keys kept apart, no key in the log, slow-body clients cut off
while others are served, and a loopback-only bind by default."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import Server, run_cli

USER_KEY, OTHER_USER_KEY, ADMIN_KEY = "sec-user-key-a1b2", "sec-user-key-c3d4", "sec-admin-key-e5f6"
WRONG_KEYS = ["sec-wrong-key-9z8y", USER_KEY + "x", USER_KEY[:-1], USER_KEY.upper()]
BODY_TIMEOUT = 6.0
Q = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # No `host` in the config: the default bind is what is checked below.
    tmp = tmp_path_factory.mktemp("security")
    (tmp / "adapters").mkdir()
    srv = Server({"engine": "transformers", "adapters_root": str(tmp / "adapters"), "state_file": str(tmp / "state.json"),
                  "api_keys": [USER_KEY, OTHER_USER_KEY], "admin_key": ADMIN_KEY, "max_model_len": 256,
                  "limits": {"max_tokens_cap": 4, "body_timeout_s": BODY_TIMEOUT}}, tmp)
    yield srv
    srv.stop()


def protected_routes() -> list[tuple[str, str]]:
    """(method, path) of every /v1 and /admin route the app defines, path parameters filled in."""
    from serving.app import create_app
    from serving.config import ServeConfig

    app = create_app(ServeConfig(engine="transformers"))
    routes = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if path.startswith(("/v1", "/admin")):
            routes += [(m, re.sub(r"\{[^}]+\}", "sales", path)) for m in sorted(route.methods - {"HEAD"})]
    return routes


ROUTES = protected_routes()


def test_the_route_list_is_complete():
    paths = {p for _, p in ROUTES}
    assert {"/v1/chat/completions", "/v1/models", "/v1/moderations", "/admin/tasks", "/admin/tasks/sales",
            "/admin/audit", "/admin/scripts/reload", "/admin/rag/reload"} <= paths


def _call(server, method, path, key: str | None, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_protected_route_refuses_without_the_right_key(server, method, path):
    right, wrong_kind = (ADMIN_KEY, USER_KEY) if path.startswith("/admin") else (USER_KEY, ADMIN_KEY)
    refused = [_call(server, method, path, None),
               _call(server, method, path, wrong_kind),
               *[_call(server, method, path, k) for k in WRONG_KEYS],
               _call(server, method, path, None, headers={"Authorization": f"Basic {right}"}),
               _call(server, method, path, None, headers={"Authorization": right}),
               _call(server, method, path, None, headers={"Authorization": "Bearer"}),
               # The key is checked before the body is read or parsed: a bad body still gets 401.
               _call(server, method, path, None, content=b"{not json", headers={"Content-Type": "application/json"})]
    for r in refused:
        assert r.status_code == 401, (method, path, r.request.headers.get("authorization"), r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and set(err) == {"message", "type", "param", "code"}
    accepted = _call(server, method, path, right, json={} if method in ("POST", "PUT") else None)
    assert accepted.status_code not in (401, 403), accepted.text


def test_both_user_keys_work_and_the_admin_key_is_admin_only(server):
    for key in (USER_KEY, OTHER_USER_KEY):
        r = _call(server, "POST", "/v1/chat/completions", key, json={"model": "base", "messages": Q, "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert _call(server, "GET", "/admin/tasks", ADMIN_KEY).status_code == 200
    assert _call(server, "GET", "/v1/models", ADMIN_KEY).status_code == 401


def test_an_admin_key_that_is_also_a_user_key_is_refused_at_start(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"engine: transformers\napi_keys: [{USER_KEY}]\nadmin_key: {USER_KEY}\n")
    proc = run_cli("-m", "guardtune.cli", "serve", "--config", str(cfg), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the admin key must differ"), proc.stderr
    assert USER_KEY not in proc.stderr + proc.stdout


# --- slow clients --------------------------------------------------------------------------------

HEAD = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\n{framing}\r\n\r\n")


def _trickle(sock: socket.socket, piece: bytes, stop: threading.Event):
    """Send one piece a second (a slowloris body) until the server closes or the test ends."""
    while not stop.wait(1.0):
        try:
            sock.sendall(piece)
        except OSError:
            return


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return out


def test_slow_bodies_are_cut_off_with_408_while_others_are_served(server):
    stop = threading.Event()
    socks, threads = [], []
    t0 = time.time()
    for i in range(12):  # a dozen attackers, half chunked, each sending a byte a second
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        chunked = i % 2 == 1
        framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 1000"
        s.sendall(HEAD.format(key=USER_KEY, framing=framing).encode() + (b"1\r\n{\r\n" if chunked else b"{"))
        t = threading.Thread(target=_trickle, args=(s, b"1\r\n \r\n" if chunked else b" ", stop), daemon=True)
        t.start()
        socks.append(s)
        threads.append(t)
    try:
        # Meanwhile the server answers everyone else at once, generation included.
        t1 = time.time()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        r = _call(server, "POST", "/v1/chat/completions", USER_KEY, json={"model": "base", "messages": Q, "max_tokens": 2})
        assert r.status_code == 200 and time.time() - t1 < BODY_TIMEOUT, r.text
        answers = [_read_all(s) for s in socks]  # each ends when the server closes the connection
        elapsed = time.time() - t0
    finally:
        stop.set()
        for s in socks:
            s.close()
    for raw in answers:
        assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
        assert b'"code":"body_timeout"' in raw and b"connection: close" in raw.lower()
    assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 4, elapsed
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_without_a_key_the_server_does_not_wait_for_the_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        t0 = time.time()
        s.sendall(HEAD.format(key="nope", framing="Content-Length: 100000").encode())
        raw = s.recv(65536)
        assert raw.startswith(b"HTTP/1.1 401 ") and time.time() - t0 < 1.0, raw[:200]


# --- binding and logs ----------------------------------------------------------------------------

def test_default_bind_is_loopback_only(server):
    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"} and {a.port for a in listening} == {server.port}
    # From another address of this machine, nothing answers.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outward interface
        own_ip = probe.getsockname()[0]
    if own_ip != "127.0.0.1":
        with pytest.raises(OSError):
            socket.create_connection((own_ip, server.port), timeout=2).close()


def test_zz_no_key_ever_reaches_the_log(server):
    """Runs last in this module: every key above was used, accepted or refused, by now."""
    log = server.log()
    assert "Application startup complete" in log
    for key in (USER_KEY, OTHER_USER_KEY, ADMIN_KEY, *[k for k in WRONG_KEYS if k]):
        assert key not in log
    assert "sec-" not in log and "Bearer" not in log and "SEC-" not in log
