"""`guardtune audit` (list or show audit records) and `guardtune badcases export` (preference JSONL).

    guardtune audit [--db PATH] [--task T] [--outcome O] [--session S] [--since ISO_OR_UNIX] [--limit N] [--json]
    guardtune audit show REQUEST_ID [--db PATH]
    guardtune audit purge --older-than-days N [--db PATH]
    guardtune badcases export [--db PATH] --out FILE [--outcomes blocked,script,...] [--since ISO_OR_UNIX]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from guardrails import outcomes
from guardrails.badcases import PAIRED, export_badcases
from guardrails.stores import is_url, open_audit_store
from kernel.cli_util import run_cli
from kernel.errors import GuardtuneError

DEFAULT_DB = "audit/audit.db"  # same as guardrails.audit.DEFAULT_DB; kept here so --help imports nothing


def add_arguments(sub) -> None:
    a = sub.add_parser("audit", help="list guarded requests from the audit store, or show one")
    _db_arg(a, DEFAULT_DB)
    a.add_argument("--task")
    a.add_argument("--outcome", help=outcomes.described())
    a.add_argument("--session", help="session id")
    a.add_argument("--since", type=parse_since, metavar="ISO_OR_UNIX",
                   help="only records at or after this time (ISO 8601, naive = UTC; or unix seconds)")
    a.add_argument("--limit", type=int, default=50)
    a.add_argument("--json", action="store_true", help="print whole records as JSON lines")
    actions = a.add_subparsers(dest="audit_action", metavar="{show,purge}")
    s = actions.add_parser("show", help="print one record in full")
    s.add_argument("request_id")
    # SUPPRESS: a subparser default would overwrite `audit --db X show ID`.
    _db_arg(s, argparse.SUPPRESS)
    p = actions.add_parser("purge", help="retention: delete records older than N days")
    _db_arg(p, argparse.SUPPRESS)
    # Checked in run_purge rather than by argparse, so a bad or missing N is a one-line error.
    p.add_argument("--older-than-days", metavar="N",
                   help="delete records whose time is more than N days (>= 0, fractions allowed) before now")
    a.set_defaults(fn=run_audit)

    b = sub.add_parser("badcases", help="export the requests whose reply the guard replaced (or would have) "
                                        "as a DPO preference dataset")
    actions = b.add_subparsers(dest="badcases_action", required=True)
    e = actions.add_parser("export", help="write TRL conversational prompt/chosen/rejected JSONL")
    _db_arg(e, DEFAULT_DB)
    e.add_argument("--out", required=True, metavar="FILE", help="JSONL file (written atomically)")
    e.add_argument("--outcomes", default=",".join(PAIRED),
                   help=f"comma-separated outcomes to export (default: {','.join(PAIRED)}, the ones a pair can "
                        f"come from), of {outcomes.described()}")
    e.add_argument("--since", type=parse_since, metavar="ISO_OR_UNIX")
    b.set_defaults(fn=run_badcases)


def _db_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--db", default=default, metavar="PATH",
                   help=f"audit store: a SQLite file (default {DEFAULT_DB}) or a postgresql:// URL")


def parse_since(value: str) -> float:
    """Unix seconds, or an ISO 8601 time (naive means UTC, as the table prints UTC)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither unix seconds nor an ISO 8601 time") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _open(db: str):
    # Reading must not create an empty store where the user mistyped a path (a postgresql:// URL is a server).
    if not is_url(db) and not Path(db).is_file():
        raise GuardtuneError(f"audit db {db}: no such file")
    try:
        return open_audit_store(db)
    except ValueError as exc:  # a URL of another scheme
        raise GuardtuneError(f"audit db {exc}") from None


def run_audit(args: argparse.Namespace) -> int:
    if getattr(args, "audit_action", None) == "purge":
        return run_purge(args)
    if args.outcome is not None:
        outcomes.check(args.outcome, "--outcome")
    with _open(args.db) as store:
        if getattr(args, "audit_action", None) == "show":
            record = store.get(args.request_id)
            if record is None:
                raise GuardtuneError(f"no audit record with request id {args.request_id!r} in {args.db}")
            print(json.dumps(record, indent=2, ensure_ascii=False))
            return 0
        filters = dict(task=args.task, outcome=args.outcome, session_id=args.session, since=args.since)
        records = store.query(**filters, limit=args.limit)
        total = store.count(**filters)
    if args.json:
        for r in records:
            print(json.dumps(r, ensure_ascii=False))
        return 0
    _print_table(records)
    print(f"{len(records)} of {total} records", file=sys.stderr)
    return 0


def run_purge(args: argparse.Namespace) -> int:
    days = parse_days(args.older_than_days)
    # Purge deletes by age alone; a filter given before `purge` must not look as if it narrowed it.
    given = [flag for flag, value in (("--task", args.task), ("--outcome", args.outcome),
                                      ("--session", args.session), ("--since", args.since)) if value is not None]
    if given:
        raise GuardtuneError(f"audit purge deletes by age only; {', '.join(given)} does not apply to it")
    cutoff = time.time() - days * 86400
    with _open(args.db) as store:
        deleted = store.purge(cutoff)
        where = store.path
    when = datetime.fromtimestamp(cutoff, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    print(f"purged {deleted} records older than {days:g} days (before {when} UTC) from {where}")
    return 0


def parse_days(value: str | None) -> float:
    """--older-than-days: a finite number >= 0."""
    if value is None:
        raise GuardtuneError("audit purge needs --older-than-days N")
    try:
        days = float(value)
    except ValueError:
        days = math.nan
    if not math.isfinite(days) or days < 0:
        raise GuardtuneError(f"--older-than-days: need a number of days >= 0, got {value!r}")
    return days


def _print_table(records: list[dict]) -> None:
    head = ("time (UTC)", "request_id", "task", "outcome", "stage", "blocked_by", "ms")
    rows = [head] + [(
        datetime.fromtimestamp(r.get("ts", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        _cut(r.get("request_id"), 36), _cut(r.get("task"), 20), _cut(r.get("outcome"), 16),
        _cut(r.get("stage"), 16), _cut(r.get("blocked_by") or (r.get("input") or {}).get("blocked_by"), 16),
        _ms((r.get("latency_ms") or {}).get("total")),
    ) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _cut(value: object, width: int) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _ms(value: object) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "-"


def run_badcases(args: argparse.Namespace) -> int:
    wanted = outcomes.check([o.strip() for o in args.outcomes.split(",") if o.strip()], "--outcomes")
    if not wanted:
        raise GuardtuneError("--outcomes: give at least one outcome, e.g. fallback,blocked")
    with _open(args.db) as store:
        result = export_badcases(store, args.out, outcomes=wanted, since=args.since)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m guardrails.audit_cli audit ...`: the two subcommands without the rest of guardtune."""
    parser = argparse.ArgumentParser(prog="guardtune")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    return run_cli(lambda: (lambda a: a.fn(a))(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
