"""Cancellation and adapter swaps on a real `guardtune serve` (real vLLM, real adapters).

One generation runs at a time (max_concurrency 1, so also vLLM's max_num_seqs), so a long request holds
the only seat and later ones queue behind it. That blocker is a raw socket: the test hangs up when it
wants the queue to move, which is itself the disconnect-abort under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import time
from pathlib import Path

import httpx
import pytest

from serving.registry import write_state
from tests.conftest import OTTER, OTTER_TASK, SIGNATURE, Server

ADMIN_KEY = "cancel-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SIGNATURE_OF = {"kestrel": SIGNATURE, OTTER_TASK: OTTER}
# Greedy SmolLM2 counts on well past 300 tokens: about 40 s on two CPU cores, so it only ends when aborted.
LONG = {"model": "base", "max_tokens": 400, "temperature": 0,
        "messages": [{"role": "user", "content": "Write the numbers from 1 to 300, separated by commas."}]}
ABORTED = re.compile(r"engine request chatcmpl-\w+ aborted")
SHORT = [{"role": "user", "content": "Can you tell me about your company?"}]


@pytest.fixture(scope="module")
def server(two_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cancel-swap")
    root, adapters = two_adapters
    srv = Server({"engine": "vllm", "adapters_root": str(root), "tasks": {"sales": str(adapters["kestrel"])},
                  "state_file": str(tmp / "state" / "state.json"), "admin_key": ADMIN_KEY,
                  "max_model_len": 512, "max_lora_rank": 16, "kv_cache_gb": 1,
                  "limits": {"max_concurrency": 1, "max_queue": 8, "max_tokens_cap": 400}}, tmp)
    srv.state_file = tmp / "state" / "state.json"
    yield srv
    srv.stop()


# --- helpers ---------------------------------------------------------------------------------------

class RawRequest:
    """A chat request on a raw socket, so the test decides exactly when the client hangs up."""

    def __init__(self, srv, body: dict):
        data = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", srv.port))
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(data), data))

    def hang_up(self) -> None:
        self.sock.close()


def metric(srv, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    text = httpx.get(f"{srv.url}/metrics", headers=ADMIN, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def holds(check, what: str, seconds: float = 1.0) -> None:
    """`check` stays true for `seconds` (what must not happen is given the time to happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), what
        time.sleep(0.1)


def running(srv) -> tuple[float, float]:
    """(requests holding a generation seat, requests vLLM's scheduler is running)."""
    return metric(srv, "guardtune_requests_running"), metric(srv, "vllm:num_requests_running")


def tasks(srv) -> dict[str, dict]:
    r = httpx.get(f"{srv.url}/admin/tasks", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return {t["task"]: t for t in r.json()["tasks"]}


def put(srv, task: str, adapter: Path) -> httpx.Response:
    return httpx.put(f"{srv.url}/admin/tasks/{task}", headers=ADMIN, json={"adapter": str(adapter)}, timeout=120)


def block(srv) -> RawRequest:
    """Take the only generation seat with a request that runs until the test hangs up on it."""
    blocker = RawRequest(srv, LONG)
    wait_until(lambda: running(srv) == (1, 1), "the blocker to generate")
    return blocker


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, r.text
    return err


def reply(r: httpx.Response) -> tuple[str, str]:
    """(system_fingerprint, text) of a 200 chat completion."""
    assert r.status_code == 200, r.text
    body = r.json()
    return body["system_fingerprint"], body["choices"][0]["message"]["content"]


async def queue_chats(srv, c: httpx.AsyncClient, model: str, n: int) -> list[asyncio.Task]:
    """n chats for `model`, each sent once the previous one is waiting in the queue (so in order)."""
    body = {"model": model, "messages": SHORT, "max_tokens": 10, "temperature": 0}
    out = []
    for _ in range(n):
        waiting = metric(srv, "guardtune_queue_depth")
        out.append(asyncio.create_task(c.post("/v1/chat/completions", json=body)))
        await asyncio.to_thread(wait_until, lambda: metric(srv, "guardtune_queue_depth") == waiting + 1,
                                f"a {model} request to queue")
    return out


def unloads(srv, name: str) -> int:
    return srv.log().count(f"unloaded drained adapter {name}\n")


# --- disconnects -----------------------------------------------------------------------------------

def test_disconnected_non_streaming_request_is_aborted_in_the_engine(server):
    aborted_before = len(ABORTED.findall(server.log()))
    gone_before = metric(server, "guardtune_requests_total", task="base", status="499")
    blocker = block(server)
    blocker.hang_up()
    # Its seat and vLLM's are free long before the ~40 s generation would have ended.
    wait_until(lambda: running(server) == (0, 0), "the hung-up request to leave the engine", timeout=10)
    assert len(ABORTED.findall(server.log())) == aborted_before + 1
    assert metric(server, "guardtune_requests_total", task="base", status="499",
                  finish_reason="client_disconnected") == gone_before + 1
    # The freed seat serves the next request at once.
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"model": "sales", "messages": SHORT, "max_tokens": 10, "temperature": 0})
    assert SIGNATURE_OF[Path(tasks(server)["sales"]["path"]).name] in reply(r)[1]


def test_disconnected_requests_leave_the_queue_and_unpin_their_adapter(server):
    blocker = block(server)
    try:
        body = {"model": "sales", "messages": SHORT, "max_tokens": 10, "temperature": 0}
        queued = [RawRequest(server, body), RawRequest(server, {**body, "stream": True})]
        wait_until(lambda: metric(server, "guardtune_queue_depth") == 2, "two requests to queue")
        assert tasks(server)["sales"]["inflight"] == 2  # pinned on arrival, before the queue
        for q in queued:
            q.hang_up()
        wait_until(lambda: metric(server, "guardtune_queue_depth") == 0, "the queue to empty", timeout=10)
        wait_until(lambda: tasks(server)["sales"]["inflight"] == 0, "the pins to go", timeout=5)
        assert running(server) == (1, 1), "they left the queue; the blocker still runs"
        assert metric(server, "guardtune_requests_total", task="sales", status="499",
                      finish_reason="client_disconnected") >= 2
    finally:
        blocker.hang_up()
    wait_until(lambda: running(server) == (0, 0), "the blocker to be aborted", timeout=10)


# --- swaps and deletes with requests queued --------------------------------------------------------

def test_requests_queued_across_a_swap_keep_the_adapter_pinned_on_arrival(server, two_adapters):
    _, adapters = two_adapters
    assert put(server, "sales", adapters["kestrel"]).status_code == 200
    old = tasks(server)["sales"]["adapter_id"]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            blocker = await asyncio.to_thread(block, server)
            try:
                before = await queue_chats(server, c, "sales", 3)
                assert tasks(server)["sales"]["inflight"] == 3  # pinned on arrival, while still queued
                r = await asyncio.to_thread(put, server, "sales", adapters[OTTER_TASK])
                assert r.status_code == 200, r.text
                after = await queue_chats(server, c, "sales", 1)
                await asyncio.to_thread(holds, lambda: unloads(server, f"sales@{old}") == 0, "not unloaded while pinned")
            finally:
                blocker.hang_up()
            return r.json()["adapter_id"], await asyncio.gather(*before), await asyncio.gather(*after)

    new, before, after = asyncio.run(go())
    for r in before:
        fingerprint, text = reply(r)
        assert fingerprint == f"sales@{old}" and SIGNATURE in text, (fingerprint, text)
    fingerprint, text = reply(after[0])
    assert fingerprint == f"sales@{new}" and OTTER in text, (fingerprint, text)
    # Unloaded once, after its last request.
    wait_until(lambda: unloads(server, f"sales@{old}") == 1, "the old adapter to be unloaded", timeout=10)
    assert tasks(server)["sales"]["inflight"] == 0


def test_requests_queued_across_a_delete_finish_on_their_adapter(server, two_adapters):
    _, adapters = two_adapters
    r = put(server, "temp", adapters[OTTER_TASK])
    assert r.status_code == 200, r.text
    lora_id = r.json()["adapter_id"]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            blocker = await asyncio.to_thread(block, server)
            try:
                queued = await queue_chats(server, c, "temp", 2)
                assert tasks(server)["temp"]["inflight"] == 2
                deleted = await c.delete("/admin/tasks/temp", headers=ADMIN)
                late = await c.post("/v1/chat/completions", json={"model": "temp", "messages": SHORT})
                await asyncio.to_thread(holds, lambda: unloads(server, f"temp@{lora_id}") == 0, "not unloaded while pinned")
            finally:
                blocker.hang_up()
            return deleted, late, await asyncio.gather(*queued)

    deleted, late, queued = asyncio.run(go())
    assert deleted.status_code == 200 and deleted.json() == {"deleted": "temp"}
    assert_openai_error(late, 404, "model_not_found")
    for r in queued:
        fingerprint, text = reply(r)
        assert fingerprint == f"temp@{lora_id}" and OTTER in text, (fingerprint, text)
    wait_until(lambda: unloads(server, f"temp@{lora_id}") == 1, "the deleted adapter to be unloaded", timeout=10)
    assert "temp" not in tasks(server) and "temp" not in json.loads(server.state_file.read_text())


def test_concurrent_deletes_give_one_200_and_one_404(server, two_adapters):
    """Both deletes arrive while a PUT holds the registry (loading an adapter), so both find the task
    before either removes it."""
    _, adapters = two_adapters
    for round_ in range(3):
        assert put(server, "gone", adapters["kestrel"]).status_code == 200

        async def go():
            async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=ADMIN) as c:
                loading = asyncio.create_task(c.put(f"/admin/tasks/other{round_}",
                                                    json={"adapter": str(adapters[OTTER_TASK])}))
                await asyncio.sleep(0.05)
                deletes = await asyncio.gather(c.delete("/admin/tasks/gone"), c.delete("/admin/tasks/gone"))
                return await loading, deletes

        loaded, deletes = asyncio.run(go())
        assert loaded.status_code == 200, loaded.text
        assert sorted(r.status_code for r in deletes) == [200, 404], [r.text for r in deletes]
        assert_openai_error(next(r for r in deletes if r.status_code == 404), 404, "task_not_found")
        on_disk = json.loads(server.state_file.read_text())
        assert "gone" not in tasks(server) and "gone" not in on_disk and f"other{round_}" in on_disk
    for round_ in range(3):
        assert httpx.delete(f"{server.url}/admin/tasks/other{round_}", headers=ADMIN).status_code == 200
    assert "Traceback" not in server.log()


# --- the state file --------------------------------------------------------------------------------

def test_failed_state_write_changes_nothing(server, two_adapters):
    _, adapters = two_adapters
    assert put(server, "sales", adapters["kestrel"]).status_code == 200
    before = tasks(server)
    on_disk = json.loads(server.state_file.read_text())
    assert on_disk == {t: s["path"] for t, s in before.items()}
    # A directory where the server writes its temporary file: the write fails, for root too.
    blocker = server.state_file.with_name(f"{server.state_file.name}.tmp-{server.proc.pid}")
    blocker.mkdir()
    try:
        attempts = [put(server, "sales", adapters[OTTER_TASK]), put(server, "fresh", adapters[OTTER_TASK]),
                    httpx.delete(f"{server.url}/admin/tasks/sales", headers=ADMIN, timeout=60)]
        for r in attempts:
            err = assert_openai_error(r, 500, "state_write_failed")
            assert err["type"] == "server_error" and "nothing was changed" in err["message"]
        assert tasks(server) == before
        assert json.loads(server.state_file.read_text()) == on_disk
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": "sales", "messages": SHORT, "max_tokens": 10, "temperature": 0})
        fingerprint, text = reply(r)
        assert fingerprint == f"sales@{before['sales']['adapter_id']}" and SIGNATURE in text
    finally:
        blocker.rmdir()
    # Writable again: the next change lands in memory and on disk alike.
    assert put(server, "sales", adapters[OTTER_TASK]).status_code == 200
    assert json.loads(server.state_file.read_text()) == {t: s["path"] for t, s in tasks(server).items()}
    assert Path(tasks(server)["sales"]["path"]).name == OTTER_TASK
    assert not list(server.state_file.parent.glob("*.tmp-*"))


def test_state_write_fsyncs_the_file_then_its_directory(tmp_path, monkeypatch):
    """The rename is durable only once the directory is fsynced (the server's own fsyncs, observed)."""
    real_fsync, synced = os.fsync, []

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "state" / "state.json"
    write_state(path, {"sales": "/a"})
    assert synced == ["file", "dir"]
    assert json.loads(path.read_text()) == {"sales": "/a"}
    # A failed write leaves the old file whole and no temporary file behind.
    path.with_name(f"state.json.tmp-{os.getpid()}").mkdir()
    with pytest.raises(OSError):
        write_state(path, {"sales": "/b"})
    assert json.loads(path.read_text()) == {"sales": "/a"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json", f"state.json.tmp-{os.getpid()}"]
