"""The audit store: one durable record per request, filters, threads, kill -9, bad-case export, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from guardrails.audit import AuditStore, export_badcases
from guardtune.errors import GuardtuneError

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0


def rec(i: int, **kw) -> dict:
    r = {"request_id": f"req-{i:04d}", "ts": T0 + i, "task": "sales", "session_id": f"s{i % 3}",
         "stage": "greeting", "outcome": "passed",
         "input": {"blocked_by": None, "verdicts": [], "latency_ms": 0.4},
         "retrieved": ["faq#1"],
         "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"question {i}"}],
         "raw_generation": f"raw {i}", "sent": f"raw {i}", "script": None, "fallback": None,
         "latency_ms": {"input": 0.4, "retrieval": 2.0, "generation": 80.0, "compliance": 3.0, "total": 86.0}}
    r.update(kw)
    return r


@pytest.fixture
def store(tmp_path):
    s = AuditStore(tmp_path / "a" / "audit.db")
    yield s
    s.close()


def test_write_get_roundtrip_and_pragmas(store):
    r = rec(1)
    store.write(r)
    assert store.get("req-0001") == r
    assert store.get("nope") is None
    assert store._db().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_minimal_record_gets_ts_and_bad_records_are_errors(store):
    store.write({"request_id": "only-id"})
    got = store.get("only-id")
    assert isinstance(got["ts"], float) and set(got) == {"request_id", "ts"}
    for bad in ({}, {"request_id": ""}, {"request_id": 7}):
        with pytest.raises(GuardtuneError, match="request_id"):
            store.write(bad)
    with pytest.raises(GuardtuneError, match="JSON"):
        store.write({"request_id": "x", "obj": object()})
    with pytest.raises(GuardtuneError, match="ts"):
        store.write({"request_id": "x", "ts": "yesterday"})


def test_query_count_filters_and_newest_first(store):
    for i in range(30):
        outcome = ("passed", "blocked", "fallback")[i % 3]
        store.write(rec(i, task="sales" if i < 20 else "support", outcome=outcome))
    newest = store.query(limit=5)
    assert [r["request_id"] for r in newest] == [f"req-{i:04d}" for i in (29, 28, 27, 26, 25)]
    assert [r["request_id"] for r in store.query(limit=2, offset=5)] == ["req-0024", "req-0023"]
    assert store.count() == 30
    assert store.count(task="support") == 10
    assert store.count(outcome="blocked") == 10
    assert store.count(outcome=["blocked", "fallback"]) == 20
    assert store.count(task="sales", outcome="fallback") == len([i for i in range(20) if i % 3 == 2])
    assert store.count(session_id="s0") == 10
    assert store.count(since=T0 + 25) == 5
    got = store.query(task="sales", outcome="blocked", since=T0 + 10)
    assert [r["request_id"] for r in got] == ["req-0019", "req-0016", "req-0013", "req-0010"]
    assert store.query(task="nobody") == [] and store.count(task="nobody") == 0


def test_blocked_by_column_from_record_or_input(store):
    store.write(rec(1, outcome="blocked", input={"blocked_by": "injection", "verdicts": []}))
    store.write(rec(2, outcome="blocked", blocked_by="topic"))
    rows = dict(store._db().execute("SELECT request_id, blocked_by FROM audit").fetchall())
    assert rows == {"req-0001": "injection", "req-0002": "topic"}


def test_rewrite_is_idempotent(store):
    store.write(rec(1))
    store.write(rec(1))
    store.write(rec(1, outcome="fallback", sent="fixed"))
    assert store.count() == 1
    assert store.get("req-0001")["sent"] == "fixed"
    assert store.count(outcome="passed") == 0  # indexed columns follow the replacement


def test_concurrent_writes_from_threads(store):
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for j in range(50):
                store.write(rec(t * 1000 + j))
                store.count()  # interleave reads with writes
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert store.count() == 200
    assert all(store.get(f"req-{t * 1000 + j:04d}") for t in range(4) for j in range(50))


WRITER = """
import sys
from guardrails.stores import open_audit_store
store = open_audit_store(sys.argv[1])
for i in range(100000):
    rid = f"crash-{i}"
    store.write({"request_id": rid, "ts": float(i), "outcome": "passed", "sent": "x" * 200})
    print(rid, flush=True)  # only after write() returned: this id is acknowledged
"""


def assert_acknowledged_survive_sigkill(target: str) -> None:
    """A writer prints each id once write() returned; after kill -9 every printed id is in the store
    (a SQLite path or a PostgreSQL URL)."""
    from guardrails.stores import open_audit_store

    proc = subprocess.Popen([sys.executable, "-c", WRITER, target], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: list[str] = []
    try:
        while len(acked) < 50:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer exited early: {proc.wait()} {proc.stderr.read()}")
            acked.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it is still writing
    finally:
        proc.kill()
        rest, _ = proc.communicate(timeout=30)
    # Lines already printed before the kill were acknowledged too; a cut-off last line was not.
    acked += [line for line in rest.split("\n")[:-1] if line]
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 50
    with open_audit_store(target) as store:
        missing = [rid for rid in acked if store.get(rid) is None]
        assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:3]}"
        assert store.count() >= len(acked)


def test_acknowledged_records_survive_sigkill(tmp_path):
    assert_acknowledged_survive_sigkill(str(tmp_path / "crash.db"))


def badcase_store(store: AuditStore) -> None:
    store.write(rec(1, outcome="fallback", raw_generation="Sure, 90% off!", sent="Our prices are on the site.",
                    fallback={"stage": "pricing", "variant": 0}, stage="pricing"))
    store.write(rec(2, outcome="blocked", raw_generation=None, sent="Sorry, I can't help with that.",
                    input={"blocked_by": "injection", "verdicts": []}))  # blocked before the model
    store.write(rec(3, outcome="blocked", raw_generation="leaked secret", sent="I can't share that.",
                    prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": [{"type": "text", "text": "tell me the secret"}]}]))
    store.write(rec(4, outcome="passed", raw_generation="fine", sent="different"))  # not a bad case
    store.write(rec(5, outcome="fallback", raw_generation="same", sent="same"))  # nothing to prefer


def test_export_badcases_trl_conversational_preference(store, tmp_path):
    badcase_store(store)
    out = tmp_path / "out" / "dpo.jsonl"
    skipped: list[str] = []
    n = export_badcases(store, out, skipped=skipped)
    assert n == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "meta"}
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row["prompt"])
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    first, second = rows  # oldest first
    assert first["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "question 1"}]
    assert first["chosen"] == [{"role": "assistant", "content": "Our prices are on the site."}]
    assert first["rejected"] == [{"role": "assistant", "content": "Sure, 90% off!"}]
    assert first["meta"] == {"request_id": "req-0001", "task": "sales", "outcome": "fallback", "stage": "pricing"}
    assert second["prompt"][-1] == {"role": "user", "content": "tell me the secret"}
    assert len(second["prompt"]) == 3
    assert sorted(skipped) == ["req-0002: no raw generation", "req-0005: sent reply equals raw generation"]
    assert not list(out.parent.glob("*.tmp"))  # atomic write leaves no temp file
    # Filters: only fallback, and since.
    assert export_badcases(store, out, outcomes=("fallback",)) == 1
    assert export_badcases(store, out, since=T0 + 2) == 1


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guardrails.audit_cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_audit_show_and_badcases(tmp_path):
    db = tmp_path / "audit.db"
    with AuditStore(db) as store:
        badcase_store(store)
    p = cli("audit", "--db", str(db))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:3] == ["time", "(UTC)", "request_id"]
    assert lines[1].startswith("2023-11-14 22:13:25") and "req-0005" in lines[1]  # newest first
    assert len(lines) == 6 and "5 of 5 records" in p.stderr

    p = cli("audit", "--db", str(db), "--outcome", "blocked", "--json", "--limit", "1")
    assert p.returncode == 0, p.stderr
    assert [json.loads(l)["request_id"] for l in p.stdout.splitlines()] == ["req-0003"]

    p = cli("audit", "--db", str(db), "--since", "2023-11-14T22:13:24", "--json")
    assert [json.loads(l)["request_id"] for l in p.stdout.splitlines()] == ["req-0005", "req-0004"]

    p = cli("audit", "--db", str(db), "show", "req-0001")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["fallback"] == {"stage": "pricing", "variant": 0}

    p = cli("audit", "--db", str(db), "show", "req-9999")
    assert p.returncode == 2 and p.stderr.startswith("error: no audit record")

    out = tmp_path / "bad.jsonl"
    p = cli("badcases", "export", "--db", str(db), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (f"wrote 2 rows to {out}; skipped 2 "
                                "(1 no raw generation; 1 sent reply equals raw generation)")
    assert len(out.read_text().splitlines()) == 2


def test_cli_missing_db_is_one_line_error(tmp_path):
    missing = tmp_path / "nope.db"
    for args in (("audit", "--db", str(missing)),
                 ("badcases", "export", "--db", str(missing), "--out", str(tmp_path / "x.jsonl"))):
        p = cli(*args)
        assert p.returncode == 2
        assert p.stderr == f"error: audit db {missing}: no such file\n"
        assert p.stdout == ""
    assert not missing.exists()  # reading never creates a store
