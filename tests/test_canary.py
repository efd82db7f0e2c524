"""A task's canary on a real `guardtune serve` (transformers engine, guardrails in monitor mode, so every reply
is the model's own and still decided): a share of the task's sessions goes to a second real adapter, each
session always to the same version; every response, audit record and metric says which version served
it; the dashboard compares the two (rendered by headless Chromium); promote and roll back; errors in
OpenAI's shape.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from serving.launcher import ServerProcess
from tests.conftest import OTTER, OTTER_TASK, SIGNATURE, run_cli
from tests.test_cancel_swap import assert_openai_error
from tests.test_dashboard import ARTIFACTS, INJECTIONS, LIBRARY, _require_browser

SHARE = 0.3
SESSIONS = 30  # two turns each
LOOSE = 30  # requests without a session: split per request
Q = [{"role": "user", "content": "Can you tell me about your company?"},
     {"role": "user", "content": "Do you install batteries?"}]


@pytest.fixture(scope="module")
def server(two_adapters, tmp_path_factory):
    root, adapters = two_adapters
    tmp = tmp_path_factory.mktemp("canary")
    guardrails = {"tasks": ["*"], "audit_db": str(tmp / "audit.db"),
                  "compliance": {"library": str(LIBRARY), "store": str(tmp / "store"), "mode": "monitor",
                                 "sessions_db": str(tmp / "sessions.db")}}
    srv = ServerProcess({"engine": "transformers", "adapters_root": str(root), "tasks": {"sales": str(adapters["kestrel"])},
                         "state_file": str(tmp / "state.json"), "max_model_len": 512, "guardrails": guardrails,
                         "limits": {"max_tokens_cap": 16}},
                        tmp, ready_timeout=300, env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    srv.state_file = tmp / "state.json"
    yield srv
    srv.stop()


def admin(srv, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{srv.url}{path}", timeout=120, **kw)  # no admin key: loopback only


def sales(srv) -> dict:
    return next(t for t in admin(srv, "GET", "/admin/tasks").json()["tasks"] if t["task"] == "sales")


def chat(srv, content: str, session: str | None, max_tokens: int = 8) -> dict:
    body = {"model": "sales", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    if session is not None:
        body["metadata"] = {"session_id": session}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def expected_version(session: str, share: float) -> str:
    """The documented split: sha256("<task>\\0<scoped session>") as a point in [0, 1), below the share is the
    canary; the scoped session (no API keys here) is sha256("\\0<session id>")[:32] in hex."""
    scoped = hashlib.sha256(f"\0{session}".encode()).hexdigest()[:32]
    point = int.from_bytes(hashlib.sha256(f"sales\0{scoped}".encode()).digest()[:8], "big") / 2**64
    return "canary" if point < share else "stable"


@pytest.fixture(scope="module")
def traffic(server, two_adapters):
    """A canary (otter) for 30% of sales, then two turns in each of 30 sessions, 30 requests without a session
    and an injection in one session of each version. Returns what the responses said, per version (for the
    injections: the scanner that blocked them)."""
    _, adapters = two_adapters
    r = admin(server, "PUT", "/admin/tasks/sales/canary", json={"adapter": str(adapters[OTTER_TASK]), "share": SHARE})
    assert r.status_code == 200, r.text
    out = {"view": r.json(), "sessions": {}, "loose": [], "counts": Counter(), "decided": Counter(),
           "fallbacks": Counter(), "blocked": {}}

    def note(body: dict) -> dict:
        v = body["version"]
        out["counts"][v] += 1
        decision = (body.get("guardrails") or {}).get("output")
        if decision:
            out["decided"][v] += 1
            out["fallbacks"][v] += decision["outcome"] == "fallback"
        return body

    for i in range(SESSIONS):
        out["sessions"][f"s{i}"] = [note(chat(server, q["content"], f"s{i}")) for q in Q]
    out["loose"] = [note(chat(server, Q[0]["content"], None, max_tokens=1)) for _ in range(LOOSE)]
    for version in ("stable", "canary"):
        session = next(s for s, turns in out["sessions"].items() if turns[0]["version"] == version)
        body = note(chat(server, INJECTIONS[0], session))
        assert body["choices"][0]["finish_reason"] == "content_filter" and body["version"] == version, body
        out["blocked"][version] = body["guardrails"]["input"]["blocked_by"]
    return out


def test_canary_errors_are_openai_shaped(server, two_adapters):
    _, adapters = two_adapters
    otter = str(adapters[OTTER_TASK])
    err = assert_openai_error(admin(server, "PUT", "/admin/tasks/nope/canary", json={"adapter": otter, "share": 0.1}),
                              404, "task_not_found")
    assert err["type"] == "not_found_error" and "unknown task 'nope'" in err["message"]
    for method, path in (("POST", "/admin/tasks/sales/canary/promote"), ("DELETE", "/admin/tasks/sales/canary")):
        err = assert_openai_error(admin(server, method, path), 404, "canary_not_found")
        assert err["message"] == "task 'sales' has no canary"
    assert_openai_error(admin(server, "DELETE", "/admin/tasks/nope/canary"), 404, "task_not_found")
    for body, param in (({"adapter": otter, "share": 1.5}, "share"), ({"adapter": otter}, "share"),
                        ({"adapter": otter, "share": "0.1"}, "share"), ({"share": 0.1}, "adapter")):
        r = admin(server, "PUT", "/admin/tasks/sales/canary", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    err = assert_openai_error(admin(server, "PUT", "/admin/tasks/sales/canary", json={"adapter": "/etc", "share": 0.1}),
                              400, "adapter_rejected")
    assert "outside the adapters root" in err["message"]
    assert sales(server)["canary"] is None  # nothing changed


def test_the_split_is_sticky_per_session(server, traffic):
    view = traffic["view"]
    canary_id, stable_id = view["canary"]["adapter_id"], view["adapter_id"]
    assert view["canary"]["share"] == SHARE and Path(view["canary"]["path"]).name == OTTER_TASK
    on_canary = []
    for session, turns in traffic["sessions"].items():
        versions = {t["version"] for t in turns}
        assert len(versions) == 1, (session, turns)  # every turn of a session on the same version
        version = versions.pop()
        assert version == expected_version(session, SHARE), session
        on_canary.append(version == "canary")
        for t in turns:  # the version's own adapter answered: its fingerprint and its trained reply
            text = t["choices"][0]["message"]["content"]
            assert t["system_fingerprint"] == f"sales@{canary_id if version == 'canary' else stable_id}", t
            assert (OTTER if version == "canary" else SIGNATURE) in text, (version, text)
    assert 0.1 <= sum(on_canary) / SESSIONS <= 0.5, on_canary  # roughly the share
    loose = Counter(t["version"] for t in traffic["loose"])  # no session: each request drawn on its own
    assert loose["canary"] and loose["stable"], loose  # at 30%, both in 30 draws (p = 1 - 2.3e-5)


def test_audit_records_and_metrics_name_the_version(server, traffic):
    session, turns = next((s, t) for s, t in traffic["sessions"].items() if t[0]["version"] == "canary")
    r = admin(server, "GET", "/admin/audit", params={"session_id": session, "task": "sales"})
    records = r.json()["records"]
    assert {rec["request_id"] for rec in records} >= {t["id"] for t in turns}, records
    by_id = {rec["request_id"]: rec for rec in records}
    for t in turns:
        assert by_id[t["id"]]["version"] == "canary" and by_id[t["id"]]["adapter"] == t["system_fingerprint"]
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    for version in ("stable", "canary"):
        assert metric(metrics, "guardtune_requests_total", task="sales", version=version) == traffic["counts"][version]
        served = traffic["counts"][version] - 1  # the injection never reached the model
        assert metric(metrics, "guardtune_request_latency_seconds_count", task="sales", version=version) == served
        assert metric(metrics, "guardtune_guardrail_blocks_total", task="sales", version=version,
                      scanner=traffic["blocked"][version]) == 1


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (Prometheus text, any label order)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1).split(",") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_the_dashboard_compares_stable_and_canary(server, traffic, tmp_path):
    data = httpx.get(f"{server.url}/dashboard/data", timeout=30).json()
    view = traffic["view"]
    assert data["canaries"] == {"sales": {"share": SHARE, "stable": f"sales@{view['adapter_id']}",
                                          "canary": f"sales@{view['canary']['adapter_id']}"}}
    assert Counter(r["version"] for r in data["records"] if r["task"] == "sales") == traffic["counts"]

    _require_browser()
    from tests.helpers.cdp import Browser

    with Browser(tmp_path / "chromium", width=1440, height=2400) as browser, browser.page() as page:
        page.send("Runtime.enable")
        page.send("Log.enable")
        page.navigate(f"{server.url}/dashboard")
        page.wait_for("document.querySelectorAll('#canary-table tbody tr').length === 2", timeout=20)
        rows = page.evaluate("[...document.querySelectorAll('#canary-table tbody tr')].map(r => ({...r.dataset}))")
        text = page.evaluate("document.getElementById('canary-panel').innerText")
        errors = [e for e in page.errors() if "favicon.ico" not in e]
        page.screenshot(ARTIFACTS / "canary-dashboard.png")
    assert not errors, errors
    assert [(r["task"], r["version"]) for r in rows] == [("sales", "stable"), ("sales", "canary")], rows
    for row in rows:
        v = row["version"]
        assert int(row["requests"]) == traffic["counts"][v], (row, traffic["counts"])
        assert 0 < float(row["p50"]) <= float(row["p95"]), row
        assert float(row["fallbackRate"]) == pytest.approx(traffic["fallbacks"][v] / traffic["decided"][v]), row
        assert float(row["blockRate"]) == pytest.approx(1 / traffic["counts"][v]), row  # one injection each
        assert row["adapter"] == data["canaries"]["sales"][v], row
    assert "30%" in text and "70%" in text, text  # the shares


def test_promote_then_a_new_canary_rolled_back(server, traffic, two_adapters):
    _, adapters = two_adapters
    canary_id = traffic["view"]["canary"]["adapter_id"]
    r = admin(server, "POST", "/admin/tasks/sales/canary/promote")
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["adapter_id"] == canary_id and view["canary"] is None  # the loaded canary itself: nothing reloaded
    assert json.loads(server.state_file.read_text()) == {"sales": str(adapters[OTTER_TASK].resolve())}
    for session in ("s0", "s1", "s2", "s3", None):  # sessions of both former versions: all on otter now
        body = chat(server, Q[0]["content"], session)
        assert body["version"] == "stable" and body["system_fingerprint"] == f"sales@{canary_id}", body
        assert OTTER in body["choices"][0]["message"]["content"]

    # A canary at share 1 takes every session; rolled back (through the CLI), the task is as before.
    proc = run_cli("-m", "guardtune.cli", "adapters", "--url", server.url, "canary", "sales",
                   str(adapters["kestrel"]), "--share", "1")
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout)["canary"]
    assert json.loads(server.state_file.read_text())["canaries"] == {
        "sales": {"path": str(adapters["kestrel"].resolve()), "share": 1.0}}
    body = chat(server, Q[0]["content"], "s0")
    assert body["version"] == "canary" and SIGNATURE in body["choices"][0]["message"]["content"], body
    proc = run_cli("-m", "guardtune.cli", "adapters", "--url", server.url, "rollback", "sales")
    assert proc.returncode == 0 and json.loads(proc.stdout)["canary"] is None, proc.stderr
    body = chat(server, Q[0]["content"], "s0")
    assert body["version"] == "stable" and OTTER in body["choices"][0]["message"]["content"], body
    assert json.loads(server.state_file.read_text()) == {"sales": str(adapters[OTTER_TASK].resolve())}
    deadline = time.monotonic() + 10
    while f"unloaded drained adapter sales@{new['adapter_id']}" not in server.log():
        assert time.monotonic() < deadline, "the rolled-back canary was not unloaded"
        time.sleep(0.2)
    assert "Traceback" not in server.log()
