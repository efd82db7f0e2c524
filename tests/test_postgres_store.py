"""The PostgreSQL session and audit stores, on a real PostgreSQL server this module starts and stops.

The audit store runs the very same behavioural tests as the SQLite store (imported from
tests/test_audit.py), then what only a shared store can show: two replicas (two store instances,
two serving stages) sharing one session and each other's audit records, acknowledged writes that
survive `kill -9` of the writer, and the `guardtune audit` / `badcases` CLI on a URL.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from guardrails.stores import open_audit_store, open_session_store, redact
from guardrails.stores.postgres import PostgresAuditStore, PostgresSessions
from kernel.errors import GuardtuneError
from tests import test_audit as sqlite_audit
from tests import test_badcases as sqlite_badcases
from tests.test_audit import ROOT, T0, badcase_store, rec


def pg_bindir() -> Path:
    """PostgreSQL's server binaries: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True):
        if (d / "initdb").is_file():
            return d
    pytest.fail("PostgreSQL server binaries not found: run `bash scripts/install_postgres.sh` (make test does)")


@dataclass
class PgServer:
    bindir: Path
    root: Path
    port: int
    owner: str | None  # the OS user the server runs as, when the tests run as root

    def cmd(self, *args: str) -> list[str]:
        # initdb and postgres refuse to run as root, so as root they run as an unprivileged user.
        return (["runuser", "-u", self.owner, "--"] if self.owner else []) + list(args)

    def url(self, db: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"host": str(self.root / "sock"), "port": str(self.port),
                                                   **params}.items())
        return f"postgresql://guardtune@/{db}?{query}"

    def sql(self, statement: str, db: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(db), autocommit=True) as conn:
            conn.execute(statement)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg():
    bindir = pg_bindir()
    owner = None
    if os.geteuid() == 0:
        owner = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        assert owner, "running as root and no unprivileged user (postgres or nobody) to run PostgreSQL as"
    root = Path(tempfile.mkdtemp(prefix="gt-pg-"))
    (root / "sock").mkdir()
    if owner:
        uid, gid = pwd.getpwnam(owner).pw_uid, pwd.getpwnam(owner).pw_gid
        for p in (root, root / "sock"):
            os.chown(p, uid, gid)
    server = PgServer(bindir, root, free_port(), owner)
    # Loopback-free: a unix socket in our own directory only, trust auth for the test's user.
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(root / "data")]
    try:
        init = subprocess.run(server.cmd(str(bindir / "initdb"), "-D", str(root / "data"), "-U", "guardtune",
                                         "--auth=trust", "-E", "UTF8", "--no-instructions"),
                              capture_output=True, text=True, timeout=120, cwd=root)
        assert init.returncode == 0, init.stdout + init.stderr
        opts = f"-p {server.port} -k {root / 'sock'} -c listen_addresses=''"
        start = subprocess.run(server.cmd(*pg_ctl, "-l", str(root / "log"), "-w", "-t", "60", "-o", opts, "start"),
                               capture_output=True, text=True, timeout=90, cwd=root)
        assert start.returncode == 0, start.stdout + start.stderr + _read(root / "log")
        server.sql("CREATE DATABASE guardtune")
        yield server
    finally:
        if (root / "data" / "postmaster.pid").exists():
            subprocess.run(server.cmd(*pg_ctl, "-m", "immediate", "-w", "stop"), capture_output=True, timeout=60, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


_schemas = itertools.count()


@pytest.fixture
def pg_url(pg) -> str:
    """A URL whose search_path is a fresh, empty schema: each test starts from an empty store."""
    schema = f"t{next(_schemas)}"
    pg.sql(f"CREATE SCHEMA {schema}", db="guardtune")
    return pg.url("guardtune", options=f"-csearch_path%3D{schema}")


@pytest.fixture
def store(pg_url):
    s = open_audit_store(pg_url)
    assert isinstance(s, PostgresAuditStore)
    yield s
    s.close()


# --- the SQLite store's behavioural tests, on PostgreSQL ------------------------------------------

@pytest.mark.parametrize("case", [
    sqlite_audit.test_minimal_record_gets_ts_and_bad_records_are_errors,
    sqlite_audit.test_query_count_filters_and_newest_first,
    sqlite_audit.test_rewrite_is_idempotent,
    sqlite_audit.test_concurrent_writes_from_threads,
    sqlite_audit.test_offset_pages_cover_every_row_once_newest_first,
    sqlite_audit.test_purge_removes_only_older_rows,
    sqlite_audit.test_purge_while_writing,
], ids=lambda f: f.__name__.removeprefix("test_"))
def test_audit_behaviour_same_as_sqlite(case, store):
    case(store)


def test_export_badcases_same_as_sqlite(store, tmp_path):
    sqlite_audit.test_export_badcases_trl_conversational_preference(store, tmp_path)


def test_badcase_pair_rules_same_as_sqlite(store, tmp_path):
    sqlite_badcases.test_pair_rules_per_outcome_and_skip_reasons(store, tmp_path)


def test_badcases_from_serving_records_on_postgres(pg_url, tmp_path, tokenizer):
    """Serving's request path auditing to PostgreSQL, exported from the URL, accepted by `train stage=dpo`."""
    responses, records, out, line = sqlite_badcases.serve_and_export(tmp_path, pg_url, tokenizer)
    sqlite_badcases.assert_serving_pairs(responses, records, out, line)
    sqlite_badcases.assert_dpo_accepts(out, tmp_path, tokenizer, rows=4)


def test_roundtrip_columns_and_durable_commit_setting(store):
    r = rec(1, outcome="blocked", input={"blocked_by": "injection", "verdicts": []})
    store.write(r)
    store.write(rec(2, outcome="blocked", blocked_by="topic"))
    assert store.get("req-0001") == r and store.get("nope") is None
    rows = store._c.run(lambda c: c.execute("SELECT request_id, blocked_by FROM guardtune_audit").fetchall())
    assert dict(rows) == {"req-0001": "injection", "req-0002": "topic"}
    assert store._c.run(lambda c: c.execute("SHOW synchronous_commit").fetchone()[0]) == "on"
    assert store._c.run(lambda c: c.execute("SELECT current_setting('transaction_read_only')").fetchone()[0]) == "off"


def test_order_is_bytewise_like_sqlite_and_nul_is_stored(store, tmp_path):
    """Newest-first ties break on request_id as SQLite compares it (bytes), and NUL in a column is legal."""
    ids = ["b", "B", "a-1", "a_1", "Z", "é"]
    with sqlite_audit.AuditStore(tmp_path / "ref.db") as ref:
        for s in (store, ref):
            for rid in ids:
                s.write({"request_id": rid, "ts": T0, "session_id": "x\x00y"})
        assert [r["request_id"] for r in store.query()] == [r["request_id"] for r in ref.query()]
        assert [r["request_id"] for r in store.iter_records(page=2)] == [r["request_id"] for r in ref.iter_records(page=2)]
        assert store.count(session_id="x\x00y") == ref.count(session_id="x\x00y") == len(ids)
        assert store.get("b")["session_id"] == "x\x00y"  # the record itself is unchanged
        assert len(store.query(limit=-1, offset=-3)) == len(ref.query(limit=-1, offset=-3)) == len(ids)


def test_purge_finds_old_rows_through_the_ts_index(store):
    for i in range(50):
        store.write(rec(i))

    def plan(c) -> str:
        with c.transaction():  # SET LOCAL: the planner setting ends with this transaction
            c.execute("SET LOCAL enable_seqscan TO off")  # a table this small would be scanned whole otherwise
            rows = c.execute("EXPLAIN " + store._PURGE_SQL, (T0, T0, 10)).fetchall()
        return " ".join(r[0] for r in rows)

    assert "guardtune_audit_ts" in store._c.run(plan)
    assert store.count() == 50  # EXPLAIN without ANALYZE deletes nothing


def test_two_replicas_purge_at_once(pg_url):
    """Two replicas' retention jobs at once: no deadlock, no wait, each old record counted once."""
    import threading

    stores = [open_audit_store(pg_url) for _ in range(2)]
    try:
        for i in range(400):
            stores[0].write(rec(i))
        counts: list[int] = []
        threads = [threading.Thread(target=lambda s=s: counts.append(s.purge(T0 + 300, batch=5))) for s in stores]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(counts) == 2 and sum(counts) == 300
        assert stores[1].count() == 100
    finally:
        for s in stores:
            s.close()


# --- several replicas ------------------------------------------------------------------------------

def test_two_replicas_share_sessions_and_audit(pg_url):
    a_sessions, b_sessions = open_session_store(pg_url), open_session_store(pg_url)
    a_audit, b_audit = open_audit_store(pg_url), open_audit_store(pg_url)
    assert isinstance(a_sessions, PostgresSessions)
    try:
        assert a_sessions.get_stage("cust-1") is None
        a_sessions.set_stage("cust-1", "pricing")
        assert b_sessions.get_stage("cust-1") == "pricing"  # the next turn lands on the other replica
        b_sessions.set_stage("cust-1", "closing")
        assert a_sessions.get_stage("cust-1") == "closing"
        a_audit.write(rec(1, session_id="cust-1", outcome="fallback"))
        b_audit.write(rec(2, session_id="cust-1", outcome="passed"))
        for s in (a_audit, b_audit):
            assert [r["request_id"] for r in s.query(session_id="cust-1")] == ["req-0002", "req-0001"]
            assert s.count(outcome="fallback") == 1
    finally:
        for s in (a_sessions, b_sessions, a_audit, b_audit):
            s.close()


def test_two_serving_replicas_carry_the_dialogue_stage(pg_url, tmp_path):
    """Two ComplianceStage/Audit instances, as two server replicas build them from one serve config."""
    import asyncio

    from guardrails.scripts import build_store
    from serving.config import ComplianceConfig, GuardrailsConfig
    from serving.pipeline import ChatContext
    from serving.stages import Audit, ComplianceStage, GuardScope

    build_store(ROOT / "examples" / "guardrails" / "scripts.yaml", tmp_path / "scripts", log=lambda m: None)
    g = GuardrailsConfig(tasks=["sales"], audit_db=pg_url,
                         compliance=ComplianceConfig(store=tmp_path / "scripts", sessions_db=pg_url, mode="monitor"))
    assert g.audit_db == pg_url and g.compliance.sessions_db == pg_url  # URLs survive the config intact
    scope = GuardScope(g.tasks)
    replica_a, replica_b = ComplianceStage(g.compliance, scope), ComplianceStage(g.compliance, scope)
    audit_a, audit_b = Audit(g.audit_db, scope), Audit(g.audit_db, scope)
    try:
        first = ChatContext("r1", "sales", [{"role": "user", "content": "How much is the battery?"}], session_id="s9")
        asyncio.run(replica_a.after(first, "It is around 7000 dollars."))
        assert first.report["output"]["stage"] == "pricing"
        assert replica_b.sessions.get_stage(first.scoped_session) == "pricing"  # inferred on A, known on B
        asyncio.run(audit_a.write({"request_id": "r1", "task": "sales", "session_id": "s9", "outcome": "monitor_script"}))
        assert audit_b.store.get("r1")["outcome"] == "monitor_script"
    finally:
        for s in (replica_a.sessions, replica_b.sessions, audit_a.store, audit_b.store):
            s.close()


# --- durability, errors, CLI -----------------------------------------------------------------------

def test_acknowledged_records_survive_sigkill(pg_url):
    sqlite_audit.assert_acknowledged_survive_sigkill(pg_url)


def test_lost_connection_is_reopened(pg, store):
    store.write(rec(1))
    pid = store._c.run(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0])
    pg.sql(f"SELECT pg_terminate_backend({pid})")  # what a server restart or failover does to a replica
    store.write(rec(2))
    assert store.count() == 2


def test_bad_url_and_closed_store_are_one_line_errors(pg, store):
    bad = f"postgresql://guardtune:s3cret@/nosuchdb?host={pg.root / 'sock'}&port={pg.port}"
    with pytest.raises(GuardtuneError) as err:
        open_audit_store(bad)
    msg = str(err.value)
    assert msg.startswith("audit db postgresql://guardtune:***@/nosuchdb") and "nosuchdb" in msg.split(": ", 1)[1]
    assert "s3cret" not in msg and "\n" not in msg
    assert redact("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
    with pytest.raises(ValueError, match="only postgresql:// URLs"):
        open_session_store("mysql://h/db")
    store.close()
    with pytest.raises(GuardtuneError, match="store is closed"):
        store.count()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guardrails.audit_cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_audit_show_and_badcases_on_postgres(pg_url, tmp_path):
    with open_audit_store(pg_url) as s:
        badcase_store(s)
    p = cli("audit", "--db", pg_url)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[1].startswith("2023-11-14 22:13:25") and "req-0005" in lines[1]  # newest first
    assert len(lines) == 6 and "5 of 5 records" in p.stderr
    p = cli("audit", "--db", pg_url, "show", "req-0001")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["fallback"] == {"stage": "pricing", "variant": 0}
    out = tmp_path / "bad.jsonl"
    p = cli("badcases", "export", "--db", pg_url, "--out", str(out))
    assert p.stdout.strip() == (f"wrote 2 rows to {out} (1 blocked, 1 fallback); skipped 2 (1 blocked before "
                                "the model: no generation; 1 chosen equals rejected: nothing to prefer)")
    p = cli("audit", "--db", "mysql://u:pw@h/db")
    assert p.returncode == 2
    assert p.stderr == "error: audit db mysql://u:***@h/db: only postgresql:// URLs or SQLite file paths are supported\n"


def test_cli_purge_on_postgres(pg_url):
    sqlite_audit.assert_cli_purge(pg_url)


def test_bare_url_takes_the_connection_from_pg_environment(pg, pg_url, monkeypatch):
    """deploy/k8s: `postgresql://` in the config, host/user/db from a ConfigMap, password from a Secret."""
    schema = pg_url.rsplit("%3D", 1)[1]
    for key, value in {"PGHOST": str(pg.root / "sock"), "PGPORT": str(pg.port), "PGUSER": "guardtune",
                       "PGDATABASE": "guardtune", "PGOPTIONS": f"-csearch_path={schema}"}.items():
        monkeypatch.setenv(key, value)
    with open_audit_store("postgresql://") as s:
        s.write(rec(7))
    with open_audit_store(pg_url) as s:  # the same table, reached by the explicit URL
        assert s.get("req-0007") == rec(7)
