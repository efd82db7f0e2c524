"""Promote a finished job's adapter to a serving task: the eval gate first, then serving's admin API.

The gate (one line per check, each passed or not):
- the job succeeded and its adapter directory holds a valid guardtune.json manifest;
- eval loss: recorded and finite, and at most `max_eval_loss` when one is set;
- forgetting: when the run measured it (`eval_forgetting: true`), perplexity on the general set at
  most `max_ppl_ratio` times the base's; required when `require_forgetting` is set;
- replay: the task's recent guarded traffic sent again with the candidate (replay.py); the share the
  guard acts on may grow by at most `max_guard_increase`. Run when the platform knows serving's audit
  store and the task has recent traffic.
A failed gate is a refusal that names the failed checks. Serving is reached over HTTP only: with a
shared task store every replica follows the swap (docs/serving.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from jobs.model import Job
from jobs.replay import recent_records, replay
from kernel.errors import GuardtuneError
from kernel.manifest import Manifest
from kernel.openai_errors import error_message


@dataclass
class GatePolicy:
    max_eval_loss: float | None = None
    max_ppl_ratio: float = 2.0
    require_forgetting: bool = False
    replay_rows: int = 20  # 0: no replay
    max_guard_increase: float = 0.1


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def gate(job: Job, policy: GatePolicy) -> list[Check]:
    if job.state != "succeeded":
        return [Check("job", False, f"the job is {job.state}, not succeeded")]
    path = Path(job.adapter_dir) / "guardtune.json"
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        return [Check("manifest", False, f"{path}: {str(exc).splitlines()[0]}")]
    checks = [Check("manifest", True, f"{manifest.task}, {manifest.method}, base {manifest.base_model.id}")]
    loss = manifest.metrics.eval_loss
    if loss is None or not math.isfinite(loss):
        checks.append(Check("eval_loss", False, f"no finite eval loss recorded ({loss}); train with an eval split"))
    else:
        ok = policy.max_eval_loss is None or loss <= policy.max_eval_loss
        checks.append(Check("eval_loss", ok, f"{loss:.4f}" + (f" (limit {policy.max_eval_loss})"
                                                             if policy.max_eval_loss is not None else "")))
    forgetting = (manifest.metrics.model_extra or {}).get("forgetting")
    if isinstance(forgetting, dict) and isinstance(forgetting.get("ppl_ratio"), (int, float)):
        ratio = float(forgetting["ppl_ratio"])
        checks.append(Check("forgetting", ratio <= policy.max_ppl_ratio,
                            f"general-set perplexity x{ratio:.3f} of the base (limit x{policy.max_ppl_ratio})"))
    else:
        checks.append(Check("forgetting", not policy.require_forgetting,
                            "not measured (train with eval_forgetting: true)"))
    return checks


def replay_check(job: Job, task: str, policy: GatePolicy, audit_db: str | None, serve_url: str,
                 admin_key: str | None) -> Check:
    if policy.replay_rows <= 0:
        return Check("replay", True, "not run: --replay-rows 0")
    if not audit_db:
        return Check("replay", True, "not run: the platform has no --audit-db")
    records = recent_records(audit_db, task, policy.replay_rows)
    if not records:
        return Check("replay", True, f"no recent guarded traffic of task {task} to replay")
    try:
        result = replay(records, job.adapter_dir, job.id, serve_url, admin_key)
    except (GuardtuneError, httpx.HTTPError) as exc:
        return Check("replay", False, f"could not replay: {exc}")
    ok = result.candidate_bad <= result.recorded_bad + policy.max_guard_increase
    return Check("replay", ok, result.detail() + f" (allowed: +{policy.max_guard_increase:.0%})")


def promote(job: Job, task: str, serve_url: str, admin_key: str | None, *, canary_share: float | None = None,
            timeout_s: float = 600.0) -> dict:
    """Swap the task on serving (or start a canary); serving's answer, or GuardtuneError with its message."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    base = serve_url.rstrip("/")
    if canary_share is None:
        url, body = f"{base}/admin/tasks/{task}", {"adapter": job.adapter_dir}
    else:
        url, body = f"{base}/admin/tasks/{task}/canary", {"adapter": job.adapter_dir, "share": canary_share}
    try:
        r = httpx.put(url, json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise GuardtuneError(f"promote: serving at {base} did not answer: {exc}") from None
    if r.status_code >= 400:
        raise GuardtuneError(f"promote: serving refused ({r.status_code}): {error_message(r)}")
    job.promoted.append({"task": task, "url": base, "at": time.time(), "canary": canary_share})
    return r.json()
