"""The audit store's interface and the logic its backends share: one record per guarded chat request.

The backends live in `guardrails/stores/`: SQLite (`sqlite.py`, one server) and PostgreSQL
(`postgres.py`, several replicas sharing one store), chosen by `guardrails.stores.open_audit_store`.
Both store the same indexed columns (`audit_row`) beside the whole record as JSON, filter the same way
(`where_clause`) and page the same way (`keyset_records`).

A record, as serving writes it (every key but request_id is optional; what is given is stored):

    {"request_id": "chatcmpl-...",        # required, the primary key
     "ts": 1717000000.0,                  # unix seconds; filled with now when missing
     "task": "sales",                     # task name (or the base model id)
     "session_id": "abc" | None,
     "stage": "greeting" | None,          # dialogue stage
     "outcome": "passed",                 # one of guardrails.outcomes (passed, blocked, ..., error_504)
     "blocked_by": "injection" | None,    # optional; else taken from input.blocked_by
     "input": {"blocked_by": ..., "verdicts": [...], "latency_ms": ...,   # moderation report;
               "waived": [{"turn": 0, "categories": [...]}]},  # raised in opening system turns, not blocking
     "retrieved": ["doc-1#3", ...],       # chunk ids given to the model
     "prompt": [{"role": ..., "content": ...}, ...],   # the messages the model saw
     "raw_generation": "..." | None,      # what the model wrote; None when blocked before it
     "sent": "...",                       # what the client got
     "script": {"id": ..., "score": ..., "text": ...} | None,   # compliance's decision: the script or
     "fallback": {"stage": ..., "variant": ..., "score": ..., "text": ...} | None,  # fallback, and its text
                                          # (sent in enforce mode; in monitor mode what would have been
                                          # sent). Records written before `text` was kept lack it.
     "latency_ms": {"input": .., "retrieval": .., "generation": .., "compliance": .., "total": ..}}

Reading: `query` (one page, newest first) and `count` take the same filters (QUERY_FILTERS), so
`audit_page` pairs them into an offset-paged listing with a next-page offset. Retention: `purge`
deletes records older than a cut-off, a batch at a time (`guardtune audit purge --older-than-days N`).

`guardrails.badcases.export_badcases` turns the records of the outcomes where the guard changed (or
would have changed) the reply into a preference dataset for `train stage=dpo`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from kernel.errors import GuardtuneError

DEFAULT_DB = Path("audit/audit.db")
QUERY_FILTERS = ("task", "outcome", "session_id", "since")  # what query, count and audit_page all accept
PURGE_BATCH = 1000  # rows per purge transaction: serving's writes never wait behind a whole purge


class AuditBackend(Protocol):
    """What serving, the CLI and `guardrails.badcases` use; SQLite and PostgreSQL (`guardrails.stores`) implement it.

    `query` and `count` take the same keyword filters (QUERY_FILTERS; all given ones must match):
    `count(**f)` is the total that paging `query(**f, limit=L, offset=O)` walks through, newest first
    (ts, then request_id, descending), so offsets 0, L, 2L, ... cover every matching record once while
    nothing is written meanwhile. A negative limit means no limit and a negative offset 0, on both backends.
    """

    def write(self, record: dict[str, Any]) -> None: ...
    def get(self, request_id: str) -> dict[str, Any] | None: ...
    def query(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None,
              limit: int = 100, offset: int = 0) -> list[dict[str, Any]]: ...
    def count(self, *, task: str | None = None, outcome: str | Iterable[str] | None = None,
              session_id: str | None = None, since: float | None = None) -> int: ...
    def iter_records(self, *, outcome: str | Iterable[str] | None = None, since: float | None = None,
                     page: int = 500) -> Iterator[dict[str, Any]]: ...
    def purge(self, before_ts: float, *, batch: int = PURGE_BATCH) -> int: ...
    def close(self) -> None: ...


def audit_row(record: dict[str, Any]) -> tuple:
    """The validated column values of one record (every backend stores exactly these)."""
    rid = record.get("request_id") if isinstance(record, dict) else None
    if not isinstance(rid, str) or not rid:
        raise GuardtuneError("audit record needs a non-empty string 'request_id'")
    record = dict(record)
    record.setdefault("ts", time.time())
    if not isinstance(record["ts"], (int, float)) or isinstance(record["ts"], bool):
        raise GuardtuneError(f"audit record {rid}: 'ts' must be unix seconds (a number)")
    try:
        blob = json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise GuardtuneError(f"audit record {rid}: not JSON-serialisable ({exc})") from None
    blocked_by = record.get("blocked_by")
    if blocked_by is None and isinstance(record.get("input"), dict):
        blocked_by = record["input"].get("blocked_by")
    return (rid, float(record["ts"]), _text(record.get("task")), _text(record.get("session_id")),
            _text(record.get("stage")), _text(record.get("outcome")), _text(blocked_by), blob)


def check_purge(before_ts: Any, batch: Any) -> tuple[float, int]:
    """The validated purge arguments (every backend checks exactly these)."""
    # NaN would delete nothing on SQLite (it binds as NULL) and everything on PostgreSQL (NaN sorts last).
    if not isinstance(before_ts, (int, float)) or isinstance(before_ts, bool) or math.isnan(before_ts):
        raise GuardtuneError(f"audit purge: before_ts must be unix seconds (a number), got {before_ts!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise GuardtuneError(f"audit purge: batch must be a positive integer, got {batch!r}")
    return float(before_ts), batch


def audit_page(store: AuditBackend, *, offset: int = 0, limit: int = 100,
               **filters: Any) -> dict[str, Any]:
    """One page of records, newest first, with what a client needs to ask for the next one:

        {"records": [...], "count": n, "total": matching records, "next_offset": offset + n or None}

    `filters` are QUERY_FILTERS (task, outcome, session_id, since), passed to `query` and `count` alike.
    next_offset is None on the last page. Offsets shift when records are written or purged between
    calls (newest first: new records push older ones to later pages), so a listing taken while
    serving writes may repeat a record across pages; that is the price of stateless offsets.
    """
    unknown = set(filters) - set(QUERY_FILTERS)
    if unknown:
        raise GuardtuneError(f"audit page: unknown filter(s) {', '.join(sorted(unknown))}; "
                             f"use {', '.join(QUERY_FILTERS)}")
    if not _whole(offset) or offset < 0 or not _whole(limit) or limit < 1:
        raise GuardtuneError(f"audit page: need offset >= 0 and limit >= 1, got offset={offset!r} limit={limit!r}")
    records = store.query(**filters, limit=limit, offset=offset)
    total = store.count(**filters)
    return {"records": records, "count": len(records), "total": total,
            "next_offset": next_offset(offset, len(records), limit, total)}


def next_offset(offset: int, count: int, limit: int, total: int) -> int | None:
    """The offset of the page after one of `count` records at `offset`, or None when it was the last."""
    # A short page means the end was reached, whatever a count taken a moment later says.
    return offset + count if count == limit and offset + count < total else None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def where_clause(task: str | None, outcome: str | Iterable[str] | None, session_id: str | None,
                 since: float | None, *, mark: str = "?", after_key: bool = False) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space, or "") and its parameters for the QUERY_FILTERS given.

    `mark` is the backend's placeholder. `after_key` adds `(ts, request_id) > (mark, mark)` last, for
    `keyset_records`: its two parameters follow the returned ones.
    """
    clauses, params = [], []
    for column, value in (("task", task), ("session_id", session_id)):
        if value is not None:
            clauses.append(f"{column} = {mark}")
            params.append(value)
    if outcome is not None:
        values = [outcome] if isinstance(outcome, str) else list(outcome)
        clauses.append(f"outcome IN ({', '.join([mark] * len(values))})")
        params += values
    if since is not None:
        clauses.append(f"ts >= {mark}")
        params.append(float(since))
    if after_key:
        clauses.append(f"(ts, request_id) > ({mark}, {mark})")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def keyset_records(fetch: Callable[[tuple[float, str]], list[tuple]], page: int) -> Iterator[dict[str, Any]]:
    """Records oldest first, a page at a time: `fetch(key)` returns up to `page` (ts, request_id, record
    JSON) rows after `key` in (ts, request_id) order. Keyset paging: writes meanwhile are safe."""
    key: tuple[float, str] = (float("-inf"), "")
    while True:
        rows = fetch(key)
        for _, _, blob in rows:
            yield json.loads(blob)
        if len(rows) < page:
            return
        key = (rows[-1][0], rows[-1][1])
