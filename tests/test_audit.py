"""The audit store: one durable record per request, filters, paging, purge, threads, kill -9, bad-case
export, CLI. Tests that take `store` run on PostgreSQL too (tests/test_postgres_store.py)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from guardrails import outcomes
from guardrails.audit import QUERY_FILTERS, AuditBackend, audit_page
from guardrails.badcases import export_badcases
from guardrails.stores import open_audit_store
from guardrails.stores.postgres import PostgresAuditStore
from guardrails.stores.sqlite import AuditStore
from kernel.errors import GuardtuneError
from tests.conftest import run_cli

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
    def work(t: int) -> None:
        for j in range(50):
            store.write(rec(t * 1000 + j))
            store.count()  # interleave reads with writes

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))  # a worker's exception is raised here
    assert store.count() == 200
    assert all(store.get(f"req-{t * 1000 + j:04d}") for t in range(4) for j in range(50))


def ids(records: list[dict]) -> list[str]:
    return [r["request_id"] for r in records]


def test_query_and_count_take_the_same_filters():
    """Both backends, and the protocol, spell query's and count's filters identically (serving pairs them)."""
    def kwonly(fn) -> dict:
        return {n: (p.annotation, p.default) for n, p in inspect.signature(fn).parameters.items()
                if p.kind is p.KEYWORD_ONLY}

    for cls in (AuditBackend, AuditStore, PostgresAuditStore):
        query, count = kwonly(cls.query), kwonly(cls.count)
        assert tuple(count) == QUERY_FILTERS, cls
        assert query == {**count, "limit": ("int", 100), "offset": ("int", 0)}, cls
        assert kwonly(cls.purge) == {"batch": ("int", 1000)}, cls
        assert kwonly(cls.query) == kwonly(AuditStore.query) and kwonly(cls.count) == kwonly(AuditStore.count)


def test_offset_pages_cover_every_row_once_newest_first(store):
    # Pairs share a ts, so the request_id tie-break decides the order within a pair.
    for i in range(23):
        store.write(rec(i, ts=T0 + i // 2, outcome=("passed", "blocked")[i % 2]))
    newest_first = ids(sorted((rec(i, ts=T0 + i // 2) for i in range(23)),
                              key=lambda r: (r["ts"], r["request_id"]), reverse=True))
    assert ids(store.query(limit=-1)) == newest_first

    pages, offset = [], 0
    while offset is not None:
        page = audit_page(store, offset=offset, limit=5)
        assert page["count"] == len(page["records"]) and page["total"] == 23
        pages.append(page)
        offset = page["next_offset"]
    assert [p["count"] for p in pages] == [5, 5, 5, 5, 3]
    assert [p["next_offset"] for p in pages] == [5, 10, 15, 20, None]
    assert [rid for p in pages for rid in ids(p["records"])] == newest_first
    # The same pages straight from query(offset=...).
    assert [rid for o in range(0, 23, 5) for rid in ids(store.query(limit=5, offset=o))] == newest_first

    # Filtered: 11 blocked records, 4 per page; the same filters go to query and count.
    blocked, offset = [], 0
    while offset is not None:
        page = audit_page(store, offset=offset, limit=4, outcome="blocked", task="sales")
        assert page["total"] == store.count(outcome="blocked", task="sales") == 11
        blocked += ids(page["records"])
        offset = page["next_offset"]
    assert blocked == [rid for rid in newest_first if int(rid[-4:]) % 2 == 1]

    # A last page that is exactly full says there is no next one; past the end is empty.
    assert audit_page(store, offset=18, limit=5)["next_offset"] is None
    assert audit_page(store, offset=30, limit=5) == {"records": [], "count": 0, "total": 23, "next_offset": None}
    assert audit_page(store, since=T0 + 100) == {"records": [], "count": 0, "total": 0, "next_offset": None}
    for bad in (dict(offset=-1), dict(limit=0), dict(offset="5"), dict(limit=True), dict(stage="greeting")):
        with pytest.raises(GuardtuneError, match="audit page"):
            audit_page(store, **bad)


def test_purge_removes_only_older_rows(store):
    for i in range(30):
        store.write(rec(i))  # ts T0 + i
    assert store.purge(T0 + 10) == 10  # strictly older: req-0010 (ts == cut-off) stays
    assert store.count() == 20 and store.get("req-0009") is None and store.get("req-0010") is not None
    assert ids(store.query(limit=-1)) == [f"req-{i:04d}" for i in range(29, 9, -1)]
    assert store.purge(T0 + 10) == 0  # nothing left to purge is no error
    assert store.purge(T0 + 25, batch=3) == 15  # several batches, one count
    assert store.count() == 5 and store.query(limit=-1)[-1]["request_id"] == "req-0025"
    assert store.purge(float("-inf")) == 0 and store.count() == 5
    for bad in (dict(before_ts=float("nan")), dict(before_ts="yesterday"), dict(before_ts=True),
                dict(before_ts=T0, batch=0), dict(before_ts=T0, batch=2.5)):
        with pytest.raises(GuardtuneError, match="audit purge"):
            store.purge(**bad)
    assert store.purge(float("inf")) == 5 and store.count() == 0


def test_purge_while_writing(store):
    """A purge in small batches while a thread writes newer records: it takes exactly the old ones."""
    for i in range(300):
        store.write(rec(i))
    errors: list[BaseException] = []
    writing = threading.Event()

    def write_new() -> None:
        try:
            for j in range(150):
                store.write(rec(10_000 + j))  # ts T0 + 10000 + j: after the cut-off
                if j == 10:
                    store.write(rec(5, ts=T0 + 20_000))  # a retry moves an old record past the cut-off
                    writing.set()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            writing.set()

    writer = threading.Thread(target=write_new)
    writer.start()
    writing.wait(30)
    purged = store.purge(T0 + 5_000, batch=7)
    writer.join()
    assert not errors
    assert purged == 299  # all the old records but the rewritten one
    assert store.get("req-0005")["ts"] == T0 + 20_000 and store.count() == 151
    assert all(store.get(f"req-{10_000 + j:04d}") for j in range(150))
    assert store.purge(T0 + 5_000) == 0


def test_purge_finds_old_rows_through_the_ts_index(store):
    plan = " ".join(row[-1] for row in store._db().execute(
        "EXPLAIN QUERY PLAN " + store._PURGE_SQL, (T0, 10)).fetchall())
    assert "USING COVERING INDEX audit_ts" in plan, plan


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
    """The file's form; the pair rules per outcome are in tests/test_badcases.py."""
    badcase_store(store)
    out = tmp_path / "out" / "dpo.jsonl"
    result = export_badcases(store, out)
    assert result.rows == 2
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
    assert result.skipped == [("req-0002", "blocked before the model: no generation"),
                              ("req-0005", "chosen equals rejected: nothing to prefer")]
    assert not list(out.parent.glob("*.tmp"))  # atomic write leaves no temp file
    # Filters: only fallback, and since.
    assert export_badcases(store, out, outcomes=("fallback",)).rows == 1
    assert export_badcases(store, out, since=T0 + 2).rows == 1


def test_outcome_vocabulary(store):
    assert outcomes.check("passed") == ["passed"]
    assert outcomes.check(("error_499", "monitor_script")) == ["error_499", "monitor_script"]
    assert outcomes.error(504) == "error_504" and outcomes.monitored(outcomes.FALLBACK) == "monitor_fallback"
    assert all(outcomes.is_outcome(o) for o in outcomes.OUTCOMES)
    for bad in ("none", "monitor", "error_", "error_42", "error_5040", "Passed", None):
        assert not outcomes.is_outcome(bad), bad
    with pytest.raises(GuardtuneError, match=r"^outcome: unknown outcome 'monitor'; use passed, blocked, "):
        outcomes.check(["passed", "monitor"])
    with pytest.raises(GuardtuneError, match="unknown outcome 'none'"):
        export_badcases(store, "/nonexistent/out.jsonl", outcomes=["none"])


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

    valid = ("use passed, blocked, redacted, script, fallback, monitor_script, monitor_fallback, leak, invalid, "
             "monitor_invalid or error_<status>")
    p = cli("audit", "--db", str(db), "--outcome", "none")  # the old name of `passed`: refused, not an empty list
    assert (p.returncode, p.stdout, p.stderr) == (2, "", f"error: --outcome: unknown outcome 'none'; {valid}\n")
    p = cli("badcases", "export", "--db", str(db), "--out", str(tmp_path / "x.jsonl"), "--outcomes", "fallback,monitor")
    assert (p.returncode, p.stderr) == (2, f"error: --outcomes: unknown outcome 'monitor'; {valid}\n")
    assert not (tmp_path / "x.jsonl").exists()
    p = cli("audit", "--db", str(db), "--outcome", "error_504", "--json")
    assert (p.returncode, p.stdout) == (0, ""), p.stderr
    assert "error_<status>" in " ".join(cli("audit", "--help").stdout.split())

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
    assert p.stdout.strip() == (f"wrote 2 rows to {out} (1 blocked, 1 fallback); skipped 2 (1 blocked before "
                                "the model: no generation; 1 chosen equals rejected: nothing to prefer)")
    assert len(out.read_text().splitlines()) == 2


def guardtune(*args: str) -> subprocess.CompletedProcess:
    """The `guardtune` command itself (its parser, run_cli's one-line errors), as a user runs it."""
    return run_cli("-m", "guardtune.cli", *args, timeout=120)


def assert_cli_purge(db: str) -> None:
    """`guardtune audit purge` on a SQLite path or a PostgreSQL URL: deletes by age, one line out."""
    now = time.time()
    with open_audit_store(db) as store:
        for age in (0, 1, 2, 5, 10, 40):  # days
            store.write(rec(age, ts=now - age * 86400))
        shown = str(store.path)  # a URL's password never shows
    p = guardtune("audit", "purge", "--db", db, "--older-than-days", "3")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("purged 3 records older than 3 days (before ") and p.stdout.count("\n") == 1
    assert p.stdout.endswith(f" UTC) from {shown}\n") and p.stderr == ""
    with open_audit_store(db) as store:
        assert ids(store.query()) == ["req-0000", "req-0001", "req-0002"]
    for bad, message in ((["--older-than-days", "-3"], "--older-than-days: need a number of days >= 0, got '-3'"),
                         (["--older-than-days=abc"], "--older-than-days: need a number of days >= 0, got 'abc'"),
                         (["--older-than-days", "inf"], "--older-than-days: need a number of days >= 0, got 'inf'"),
                         ([], "audit purge needs --older-than-days N")):
        p = guardtune("audit", "purge", "--db", db, *bad)
        assert (p.returncode, p.stdout, p.stderr) == (2, "", f"error: {message}\n")
    p = guardtune("audit", "--db", db, "--outcome", "passed", "purge", "--older-than-days", "0")
    assert (p.returncode, p.stderr) == (2, "error: audit purge deletes by age only; --outcome does not apply to it\n")
    p = guardtune("audit", "--db", db, "purge", "--older-than-days", "0.5")  # --db before `purge` works too
    assert p.returncode == 0 and p.stdout.startswith("purged 2 records older than 0.5 days"), p.stdout + p.stderr
    with open_audit_store(db) as store:
        assert ids(store.query()) == ["req-0000"]


def test_cli_purge(tmp_path):
    assert_cli_purge(str(tmp_path / "audit.db"))
    missing = tmp_path / "nope.db"
    p = guardtune("audit", "purge", "--db", str(missing), "--older-than-days", "1")
    assert (p.returncode, p.stderr) == (2, f"error: audit db {missing}: no such file\n")
    assert not missing.exists()  # purging never creates a store


def test_cli_missing_db_is_one_line_error(tmp_path):
    missing = tmp_path / "nope.db"
    for args in (("audit", "--db", str(missing)),
                 ("badcases", "export", "--db", str(missing), "--out", str(tmp_path / "x.jsonl"))):
        p = cli(*args)
        assert p.returncode == 2
        assert p.stderr == f"error: audit db {missing}: no such file\n"
        assert p.stdout == ""
    assert not missing.exists()  # reading never creates a store
