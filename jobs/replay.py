"""The gate's replay: a task's recent guarded traffic, sent again through serving with the candidate.

The candidate adapter is put on serving as a temporary task (`gate-<job id>`), guarded like every
task; the recent prompts of the task (from serving's audit store, PII already redacted there) are
sent to it, greedy and short, each with its recorded dialogue stage; then the temporary task is
removed. What the guard did to the candidate's replies is compared with what it did to the replies
that went out: the share that moderation blocked, or compliance replaced (or would have, in monitor
mode), or the output filter stopped, must not grow by more than the policy allows.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx

from guardrails.stores import open_audit_store
from kernel.errors import GuardtuneError

BAD = {"blocked", "script", "fallback", "monitor_script", "monitor_fallback", "leak"}
WINDOW_S = 7 * 24 * 3600


@dataclass
class ReplayResult:
    rows: int
    recorded_bad: float  # share of the replayed records the guard acted on, as served
    candidate_bad: float  # the same share for the candidate's replies

    def detail(self) -> str:
        return (f"{self.rows} recent requests replayed: the guard acted on {self.candidate_bad:.0%} of the "
                f"candidate's replies vs {self.recorded_bad:.0%} as served")


def recent_records(audit_db: str | Path, task: str, rows: int) -> list[dict]:
    """The task's last `rows` records of the past week that hold a prompt (oldest first)."""
    store = open_audit_store(audit_db)
    try:
        found = deque((r for r in store.iter_records(since=time.time() - WINDOW_S)
                       if r.get("task") == task and isinstance(r.get("prompt"), list) and r["prompt"]), maxlen=rows)
    finally:
        store.close()
    return list(found)


def replay(records: list[dict], adapter_dir: str, job_id: str, serve_url: str, admin_key: str | None,
           *, max_tokens: int = 48) -> ReplayResult:
    base = serve_url.rstrip("/")
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    temp = f"gate-{job_id}"
    with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
        r = http.put(f"/admin/tasks/{temp}", json={"adapter": adapter_dir})
        if r.status_code >= 400:
            raise GuardtuneError(f"replay: serving would not load the candidate ({r.status_code}): {r.text[:300]}")
        try:
            bad = sum(_acted_on(http, temp, rec, max_tokens) for rec in records)
        finally:
            http.delete(f"/admin/tasks/{temp}")
    recorded = sum(r.get("outcome") in BAD for r in records)
    n = max(len(records), 1)
    return ReplayResult(len(records), recorded / n, bad / n)


def _acted_on(http: httpx.Client, task: str, record: dict, max_tokens: int) -> bool:
    body = {"model": task, "messages": record["prompt"], "max_tokens": max_tokens, "temperature": 0}
    if record.get("stage"):
        body["metadata"] = {"dialogue_stage": str(record["stage"])}
    r = http.post("/v1/chat/completions", json=body)
    if r.status_code >= 400:
        return r.status_code == 400 and "blocked" in r.text  # a refusal as an error is the guard acting too
    report = r.json().get("guardrails") or {}
    if (report.get("input") or {}).get("blocked_by") or (report.get("reply") or {}).get("stopped"):
        return True
    return (report.get("output") or {}).get("outcome") in ("script", "fallback")
