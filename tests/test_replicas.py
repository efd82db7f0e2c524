"""Replicas share one committed task mapping (`task_store`) in a real PostgreSQL server: a change made on any
replica (a swap, a delete, a canary, a promotion) reaches the others within a few seconds, through the
same steps as a change made on them; a replica that cannot apply one says so in GET /admin/tasks and
catches up once it can; a restarted replica serves the shared mapping, not its config's tasks.

Two real `guardtune serve` processes on the transformers engine (it starts in seconds) and the real
adapters of `two_adapters`. Replica B mounts its own adapters root (a copy): the store names adapters
relative to the root, so B finds them under its own.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from serving.launcher import ServerProcess
from serving.task_store import Committed, PostgresTaskStore, SQLiteTaskStore
from tests.conftest import OTTER, OTTER_TASK, SIGNATURE
from tests.test_cancel_swap import assert_openai_error
from tests.test_postgres_store import pg  # noqa: F401  (fixture: a real PostgreSQL server)

ADMIN_KEY = "replicas-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
Q = [{"role": "user", "content": "Can you tell me about your company?"}]
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # two servers on a small box
POLL_S = 2.0  # the default task_store_poll_s


@pytest.fixture(scope="module")
def store_url(pg) -> str:  # noqa: F811
    pg.sql("CREATE SCHEMA replicas", db="guardtune")
    return pg.url("guardtune", options="-csearch_path%3Dreplicas")


def start_replica(tmp: Path, name: str, root: Path, store_url: str, **config) -> ServerProcess:
    cfg = {"engine": "transformers", "adapters_root": str(root), "tasks": {"sales": str(root / "kestrel")},
           "state_file": str(tmp / name / "state.json"), "task_store": store_url, "admin_key": ADMIN_KEY,
           "max_model_len": 512, "limits": {"max_tokens_cap": 24}, **config}
    srv = ServerProcess(cfg, tmp / name, ready_timeout=300, env=ENV)
    srv.root = root
    return srv


@pytest.fixture(scope="module")
def replicas(two_adapters, store_url, tmp_path_factory):
    """Replicas A (on two_adapters' root) and B (on its own copy of kestrel), started at once, so both find
    the store empty."""
    root, adapters = two_adapters
    tmp = tmp_path_factory.mktemp("replicas")
    root_b = tmp / "adapters-b"
    shutil.copytree(adapters["kestrel"], root_b / "kestrel")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_replica, tmp, "a", root, store_url),
                   pool.submit(start_replica, tmp, "b", root_b, store_url)]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        assert len(started) == 2, [str(f.exception()) for f in futures if f.exception() is not None]
        a, b = started
        b.tmp = tmp
        yield a, b
    finally:
        for srv in started:
            srv.stop()


def admin(srv, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{srv.url}{path}", headers=ADMIN, timeout=120, **kw)


def listing(srv) -> dict:
    r = admin(srv, "GET", "/admin/tasks")
    assert r.status_code == 200, r.text
    return r.json()


def task(srv, name: str) -> dict | None:
    return next((t for t in listing(srv)["tasks"] if t["task"] == name), None)


def wait_for(check, what: str, timeout: float = 4 * POLL_S + 4):
    """`check()`'s first truthy value, and the seconds it took."""
    t0 = time.monotonic()
    while not (value := check()):
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)
    return value, time.monotonic() - t0


def chat(srv, session: str | None = None, model: str = "sales", max_tokens: int = 12) -> dict:
    body = {"model": model, "messages": Q, "max_tokens": max_tokens, "temperature": 0}
    if session is not None:
        body["metadata"] = {"session_id": session}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def serves(srv, name: str, adapter: str):
    """The task's view once the replica serves `adapter` (a directory name) for it, following the store."""
    t = task(srv, name)
    return t if t and t["path"] and Path(t["path"]).name == adapter and t["following"] else None


def test_both_replicas_serve_the_mapping_the_first_one_committed(replicas):
    a, b = replicas
    views = [listing(a), listing(b)]
    for view, srv in zip(views, replicas):
        assert view["store"]["shared"] is True and view["store"]["error"] is None, view
        assert view["store"]["target"].startswith("postgresql://guardtune@/guardtune"), view
        assert view["store"]["version"] == 1, view  # one replica seeded the store; the other found it seeded
        [sales] = view["tasks"]
        assert sales["path"] == str((srv.root / "kestrel").resolve()) and sales["following"] and sales["canary"] is None
    for srv in replicas:
        assert "following task store postgresql://guardtune@/guardtune" in srv.log()


def test_a_swap_on_one_replica_reaches_the_other(replicas, two_adapters):
    a, b = replicas
    _, adapters = two_adapters
    shutil.copytree(adapters[OTTER_TASK], b.root / OTTER_TASK)  # B's own mount holds the adapter too
    r = admin(a, "PUT", "/admin/tasks/sales", json={"adapter": str(adapters[OTTER_TASK])})
    assert r.status_code == 200, r.text
    view, took = wait_for(lambda: serves(b, "sales", OTTER_TASK), "replica B to follow the swap")
    assert took < 2 * POLL_S + 2, took
    assert view["path"] == str((b.root / OTTER_TASK).resolve())
    body = chat(b)  # the new adapter answers on B: its reply and its fingerprint
    assert OTTER in body["choices"][0]["message"]["content"], body
    assert body["system_fingerprint"] == f"sales@{view['adapter_id']}" and body["version"] == "stable"
    assert listing(a)["store"]["version"] == listing(b)["store"]["version"] == 2
    assert "serving task mapping version 2" in b.log()


def test_a_delete_on_one_replica_reaches_the_other(replicas, two_adapters):
    a, b = replicas
    _, adapters = two_adapters
    assert admin(a, "PUT", "/admin/tasks/support", json={"adapter": str(adapters["kestrel"])}).status_code == 200
    view, _ = wait_for(lambda: serves(b, "support", "kestrel"), "replica B to add the task")
    assert SIGNATURE in chat(b, model="support")["choices"][0]["message"]["content"]
    assert admin(b, "DELETE", "/admin/tasks/support").json() == {"deleted": "support"}
    wait_for(lambda: task(a, "support") is None, "replica A to drop the task")
    r = httpx.post(f"{a.url}/v1/chat/completions", json={"model": "support", "messages": Q, "max_tokens": 2}, timeout=60)
    assert_openai_error(r, 404, "model_not_found")
    wait_for(lambda: f"unloaded drained adapter support@{view['adapter_id']}" in b.log(), "B to unload it")


def test_a_canary_and_its_promotion_reach_the_other_replica(replicas, two_adapters):
    """The canary (its adapter and share) is part of the shared mapping; the split is the same on every
    replica, so a session stays on one version whichever replica answers it."""
    a, b = replicas
    _, adapters = two_adapters
    stable = task(b, "sales")
    r = admin(a, "PUT", "/admin/tasks/sales/canary", json={"adapter": str(adapters["kestrel"]), "share": 0.5})
    assert r.status_code == 200 and r.json()["canary"]["share"] == 0.5, r.text
    view, _ = wait_for(lambda: (t := task(b, "sales"))["canary"] and t, "replica B to load the canary")
    assert Path(view["canary"]["path"]).name == "kestrel" and view["canary"]["share"] == 0.5
    assert view["adapter_id"] == stable["adapter_id"]  # the stable adapter stayed loaded
    versions = {}
    for i in range(10):
        on_a, on_b = chat(a, f"cust-{i}", max_tokens=4), chat(b, f"cust-{i}", max_tokens=4)
        assert on_a["version"] == on_b["version"], (i, on_a, on_b)
        versions[i] = on_b["version"]
        canary_id, stable_id = view["canary"]["adapter_id"], view["adapter_id"]
        assert on_b["system_fingerprint"] == f"sales@{canary_id if on_b['version'] == 'canary' else stable_id}"
    assert set(versions.values()) == {"stable", "canary"}, versions  # 10 sessions at 0.5: both (p = 1 - 2^-9)

    r = admin(b, "POST", "/admin/tasks/sales/canary/promote")
    assert r.status_code == 200 and r.json()["canary"] is None, r.text
    promoted, _ = wait_for(lambda: (t := task(a, "sales"))["canary"] is None and t, "replica A to promote")
    assert Path(promoted["path"]).name == "kestrel"
    assert SIGNATURE in chat(a, "cust-0")["choices"][0]["message"]["content"]


def test_a_replica_that_cannot_apply_a_change_reports_it_and_catches_up(replicas, two_adapters):
    a, b = replicas
    root, adapters = two_adapters
    shutil.copytree(adapters[OTTER_TASK], root / "otter-v2", dirs_exist_ok=True)  # on A's mount only, for now
    before = task(b, "sales")
    assert admin(a, "PUT", "/admin/tasks/sales", json={"adapter": str(root / "otter-v2")}).status_code == 200
    view, _ = wait_for(lambda: (t := task(b, "sales"))["error"] and t, "replica B to report the failure")
    assert view["following"] is False and "otter-v2: no such directory" in view["error"], view
    assert view["adapter_id"] == before["adapter_id"]  # the old adapter keeps serving
    assert SIGNATURE in chat(b)["choices"][0]["message"]["content"]
    assert listing(b)["store"]["version"] == listing(a)["store"]["version"]
    assert "task sales not served as committed" in b.log() and "Traceback" not in b.log()

    # A canary rolled back meanwhile reaches B too, though B still cannot load the new stable adapter.
    assert admin(a, "PUT", "/admin/tasks/sales/canary",
                 json={"adapter": str(adapters[OTTER_TASK]), "share": 0.5}).status_code == 200
    wait_for(lambda: (t := task(b, "sales"))["canary"] and t, "replica B to serve the canary")
    assert admin(a, "DELETE", "/admin/tasks/sales/canary").status_code == 200
    view, _ = wait_for(lambda: (t := task(b, "sales"))["canary"] is None and t, "replica B to roll the canary back")
    assert view["following"] is False and "otter-v2" in view["error"], view

    shutil.copytree(adapters[OTTER_TASK], b.root / "otter-v2")  # the adapter arrives on B's mount
    view, _ = wait_for(lambda: serves(b, "sales", "otter-v2"), "replica B to catch up", timeout=5 * POLL_S + 10)
    assert view["error"] is None and OTTER in chat(b)["choices"][0]["message"]["content"]
    shutil.rmtree(root / "otter-v2")  # A has it loaded; other modules share this adapters root


def test_a_restarted_replica_serves_the_shared_mapping(replicas, store_url):
    """Its config says kestrel; the store says otter-v2 (the last change): the store wins."""
    a, b = replicas
    b.stop()
    restarted = start_replica(b.tmp, "b2", b.root, store_url)
    try:
        view = task(restarted, "sales")
        assert Path(view["path"]).name == "otter-v2" and view["following"], view
        assert listing(restarted)["store"]["version"] == listing(a)["store"]["version"]
        assert OTTER in chat(restarted)["choices"][0]["message"]["content"]
    finally:
        restarted.stop()


# --- the stores themselves: concurrent changes from several replicas, none lost ------------------------

def concurrent_changes(stores) -> Committed:
    """Each store (a replica) adds 20 tasks from its own thread at once; returns the final mapping."""
    def add(i, store):
        for n in range(20):
            store.update(lambda c, t=f"r{i}-{n}": c.with_task(t, f"adapters/{t}"), Committed())

    threads = [threading.Thread(target=add, args=(i, s)) for i, s in enumerate(stores)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return stores[0].read()


def test_postgres_store_applies_concurrent_changes_one_after_the_other(pg):  # noqa: F811
    pg.sql("CREATE SCHEMA concurrent", db="guardtune")
    url = pg.url("guardtune", options="-csearch_path%3Dconcurrent")
    stores = [PostgresTaskStore(url) for _ in range(3)]
    try:
        assert stores[0].read() is None
        final = concurrent_changes(stores)
        assert final.version == 60 and len(final.tasks) == 60
        unchanged = stores[1].update(lambda c: c.with_task("r0-0", "adapters/r0-0"), Committed())
        assert unchanged.version == 60  # a change that changes nothing keeps the version
    finally:
        for s in stores:
            s.close()


def test_sqlite_store_is_shared_by_servers_on_one_host(tmp_path):
    path = tmp_path / "tasks.db"
    stores = [SQLiteTaskStore(path) for _ in range(3)]
    try:
        final = concurrent_changes(stores)
        assert final.version == 60 and len(final.tasks) == 60
        canary = stores[2].update(lambda c: c.with_canary("r1-3", "adapters/new", 0.25), Committed())
        assert stores[0].read().canaries == {"r1-3": {"path": "adapters/new", "share": 0.25}} and canary.version == 61
        gone = stores[1].update(lambda c: c.without_task("r1-3"), Committed())
        assert "r1-3" not in gone.tasks and not gone.canaries  # a canary never outlives its task
    finally:
        for s in stores:
            s.close()


def test_split_point_is_the_documented_hash():
    """A session's place in [0, 1): the first 8 bytes of sha256("<task>\\0<scoped session>"), big-endian."""
    from serving.registry import split_point

    digest = hashlib.sha256(b"sales\0abc").digest()
    assert split_point("sales", "abc") == int.from_bytes(digest[:8], "big") / 2**64
    assert all(0 <= split_point("sales", None) < 1 for _ in range(100))
