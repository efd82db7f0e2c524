"""The bad-case loop in one action: the guard's recent bad cases for a task -> a DPO job.

`badcases export` turns what the guard replaced (or, in monitor mode, would have) into preference
pairs; the job trains on them with `stage: dpo`, and once it succeeds it is promoted through the same
eval gate as any job.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from guardrails.badcases import BadcaseExport, export_badcases
from guardrails.stores import open_audit_store
from jobs.model import Job
from jobs.submit import BadJob, make_job

MIN_PAIRS = 4  # fewer would leave nothing to hold out for the gate's eval loss


def badcase_job(audit_db: str | Path, task: str, workdir: Path, *, device: str, since_hours: float = 24.0,
                max_steps: int = 50, beta: float = 0.1, extra: dict | None = None) -> tuple[Job, BadcaseExport]:
    """A queued DPO job on the task's bad cases of the last `since_hours`, or BadJob saying why not."""
    out = workdir / "data" / "badcases" / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.jsonl"
    store = open_audit_store(audit_db)
    try:
        export = export_badcases(store, out, since=time.time() - since_hours * 3600, task=task)
    finally:
        store.close()
    if export.rows < MIN_PAIRS:
        raise BadJob([f"{export.summary()}: a DPO job needs at least {MIN_PAIRS} pairs"])
    raw = {"eval_split": 0.2, **(extra or {}), "stage": "dpo", "task": task, "train_file": str(out),
           "max_steps": max_steps, "beta": beta}  # the loop's own keys last: extra keys cannot change them
    return make_job(raw, workdir, device=device), export
