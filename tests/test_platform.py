"""The training platform on real components: `guardtune platform` and `guardtune serve` processes, real
`train` runs, headless Chromium on the page, the official `openai` client, SQLite and PostgreSQL stores.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from jobs.admission import never_fits, reason_to_wait
from jobs.model import Job
from jobs.store import open_store
from serving.launcher import ChildServer, free_port
from tests.conftest import Server, tiny_rows, write_jsonl
from tests.test_dashboard import _require_browser
from tests.test_postgres_store import pg, pg_url  # noqa: F401  (fixtures: a real PostgreSQL server)

ARTIFACTS = Path(__file__).parent / "artifacts"
# A job that trains in seconds (tests/conftest.py tiny_config), written as a user would type it on the page.
TINY = """task: {task}
train_file: tiny.jsonl
max_steps: {steps}
eval_split: 0.2
max_length: 96
batch_size: 4
rank: 8
alpha: 16
learning_rate: 0.003
warmup_ratio: 0.0
lr_scheduler: constant
save_steps: {save}
eval_steps: {save}
gradient_checkpointing: false
report_to: none
generation_samples: 0
"""


class PlatformProcess(ChildServer):
    """`guardtune platform` in its own session, as an operator starts it."""

    ready_path = "/api/settings"

    def __init__(self, workdir: Path, *, serve_url: str | None = None, port: int | None = None, args: tuple = ()):
        port = port or free_port()
        cmd = [sys.executable, "-m", "guardtune.cli", "platform", "--workdir", str(workdir), "--port", str(port), *args]
        cmd += ["--serve-url", serve_url] if serve_url else []
        super().__init__(cmd, workdir / f"platform-{time.time_ns()}.log", port, ready_timeout=120,
                         env={"HF_HUB_OFFLINE": "1"}, cwd=workdir)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def workdir_with_data(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_jsonl(path / "tiny.jsonl", tiny_rows())
    (path / "adapters").mkdir(exist_ok=True)
    return path


def wait_job(url: str, job_id: str, until, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/api/jobs/{job_id}", timeout=10).json()
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {job['state']} {job.get('error')}")


@pytest.fixture(scope="module")
def serve_and_platform(tmp_path_factory):
    """A guarded `guardtune serve` with no tasks yet, and a platform whose adapters land under its root."""
    work = workdir_with_data(tmp_path_factory.mktemp("platform"))
    with Server({"adapters_root": str(work / "adapters"), "state_file": str(work / "serve-state.json")},
                work / "serve") as serve, \
            PlatformProcess(work, serve_url=serve.url, args=("--audit-db", str(work / "audit.db"))) as platform:
        yield serve, platform, work


def test_page_submits_watches_promotes_and_the_adapter_chats(serve_and_platform, tmp_path):
    _require_browser()
    import openai

    from tests.helpers.cdp import Browser

    serve, platform, work = serve_and_platform
    shots = ARTIFACTS / "platform"
    shots.mkdir(parents=True, exist_ok=True)
    with Browser(tmp_path / "chromium", width=1440, height=1200) as browser, browser.page() as page:
        page.send("Runtime.enable")
        page.navigate(platform.url + "/")
        assert page.evaluate("typeof Plotly") == "object", "plotly.min.js did not load from the platform"
        # A misspelt key: the schema's problem shows inline before anything is submitted.
        page.evaluate(f"document.getElementById('yaml').value = {json.dumps(TINY.format(task='e2e', steps=8, save=4) + 'lerning_rate: 1')};"
                      "document.getElementById('yaml').dispatchEvent(new Event('input'))")
        page.wait_for("document.getElementById('problems').textContent.includes(\"did you mean 'learning_rate'\")",
                      timeout=20)
        page.evaluate(f"document.getElementById('yaml').value = {json.dumps(TINY.format(task='e2e', steps=8, save=4))};"
                      "document.getElementById('yaml').dispatchEvent(new Event('input'))")
        page.wait_for("document.body.dataset.problems === '0' && "
                      "document.getElementById('estimate').textContent.includes('GiB')", timeout=20)
        page.evaluate("document.getElementById('submit').click()")
        page.wait_for("document.body.dataset.state === 'running'", timeout=60)
        page.wait_for("Number(document.body.dataset.lossPoints) >= 2", timeout=240)
        page.screenshot(shots / "1-running.png")
        page.wait_for("document.body.dataset.state === 'succeeded'", timeout=300)
        page.wait_for("Number(document.body.dataset.lossPoints) >= 8", timeout=10)
        for chart in ("chart-loss", "chart-tps", "chart-memory"):
            assert page.evaluate(f"!!document.getElementById('{chart}').querySelector('.main-svg')"), chart
        traces = page.evaluate("document.getElementById('chart-loss').data.map(t => [t.name, t.x.length])")
        assert traces[0][1] >= 8 and traces[1][1] >= 1, traces  # the loss per step, and the eval loss
        page.screenshot(shots / "2-succeeded.png")

        page.evaluate("document.getElementById('promote-task').value = 'e2e'; document.getElementById('promote').click()")
        page.wait_for("!!document.body.dataset.promoted", timeout=300)
        result = page.evaluate("document.getElementById('promote-result').textContent")
        assert page.evaluate("document.body.dataset.promoted") == "yes", result
        assert "eval_loss ok" in result and "manifest ok" in result, result
        assert "replay ok (no recent guarded traffic of task e2e to replay)" in result, result
        page.screenshot(shots / "3-promoted.png")

    job = httpx.get(f"{platform.url}/api/jobs", timeout=10).json()["jobs"][0]
    tasks = httpx.get(f"{serve.url}/admin/tasks", timeout=10).json()["tasks"]
    assert any(t["task"] == "e2e" and Path(t["path"]).resolve() == Path(job["adapter_dir"]).resolve()
               for t in tasks), tasks
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="e2e", messages=[{"role": "user", "content": "Who are you?"}],
                                       max_tokens=16, temperature=0)
    assert r.choices[0].message.content and r.system_fingerprint.startswith("e2e@"), r


def test_bad_config_is_a_400_listing_every_problem(serve_and_platform):
    _, platform, _ = serve_and_platform
    r = httpx.post(f"{platform.url}/api/jobs", json={"config": {"train_file": "missing.jsonl", "lerning_rate": 1},
                                                    "overrides": ["max_steps=many"]}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_config" and len(err["problems"]) == 3, err
    assert any("missing.jsonl: no such file" in p for p in err["problems"])
    assert any("learning_rate" in p for p in err["problems"]) and any("max_steps" in p for p in err["problems"])
    r = httpx.post(f"{platform.url}/api/jobs", content=b"task: [unclosed", timeout=30,
                   headers={"Content-Type": "application/yaml"})
    assert r.status_code == 400 and "not valid YAML" in r.json()["error"]["message"]
    assert httpx.get(f"{platform.url}/api/jobs/nope", timeout=10).json()["error"]["code"] == "job_not_found"
    # A web page's form or text/plain POST (no CORS preflight) is refused, and so is a rebound host name.
    r = httpx.post(f"{platform.url}/api/jobs", content=b'{"config": {}}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.get(f"{platform.url}/api/jobs", headers={"Host": "attacker.example"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    r = httpx.get(f"{platform.url}/api/jobs", headers={"X-Real-IP": "203.0.113.9"}, timeout=10)
    assert r.status_code == 403
    r = httpx.post(f"{platform.url}/api/jobs", content=b"x" * ((1 << 20) + 1), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = httpx.delete(f"{platform.url}/api/tasks/sales%3F/canary", timeout=10)  # no way to reach another route
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{platform.url}/api/nothing-here", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_the_gate_refuses_a_job_that_did_not_succeed(serve_and_platform):
    _, platform, _ = serve_and_platform
    r = httpx.post(f"{platform.url}/api/jobs", json={"config": {"task": "gate", "train_file": "tiny.jsonl",
                                                               "max_steps": 500, "report_to": "none"}}, timeout=30)
    job_id = r.json()["id"]
    assert httpx.post(f"{platform.url}/api/jobs/{job_id}/cancel", timeout=60).json()["state"] == "cancelled"
    r = httpx.post(f"{platform.url}/api/jobs/{job_id}/promote", json={"task": "gate"}, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["code"] == "gate_failed"
    assert r.json()["error"]["gate"][0] == {"name": "job", "passed": False, "detail": "the job is cancelled, not succeeded"}


def test_the_badcase_loop_turns_a_tasks_bad_cases_into_a_dpo_job_that_promotes(serve_and_platform):
    from guardrails.stores.sqlite import AuditStore
    from tests.test_audit import rec

    serve, platform, work = serve_and_platform
    audit = AuditStore(work / "audit.db")
    now = time.time()
    for i in range(8):  # monitor mode: the raw reply went out; compliance would have sent the fallback
        audit.write(rec(i, ts=now - 60 + i, task="loop", outcome="monitor_fallback", stage="pricing",
                        raw_generation=f"Sure, {10 + i}% off if you sign today!",
                        sent=f"Sure, {10 + i}% off if you sign today!",
                        fallback={"stage": "pricing", "variant": 0, "text": "Our prices are on the website."}))
    audit.write(rec(99, ts=now - 30, task="other", outcome="monitor_fallback", raw_generation="x", sent="x",
                    fallback={"stage": "pricing", "variant": 0, "text": "y"}))
    audit.close()
    small = {"max_length": 96, "batch_size": 2, "rank": 8, "alpha": 16, "learning_rate": 0.001, "report_to": "none",
             "generation_samples": 0, "gradient_checkpointing": False, "eval_steps": 2, "save_steps": 2}
    r = httpx.post(f"{platform.url}/api/loop/dpo", json={"task": "loop", "audit_db": str(work / "audit.db"),
                                                         "max_steps": 4, "config": small}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["export"].startswith("wrote 8 rows") and "(8 monitor_fallback)" in r.json()["export"]
    job = wait_job(platform.url, r.json()["id"], lambda j: j["state"] in ("succeeded", "failed"), timeout=600)
    assert job["state"] == "succeeded" and job["config"]["stage"] == "dpo", job.get("error")
    assert job["manifest"]["train_config"]["stage"] == "dpo"
    r = httpx.post(f"{platform.url}/api/jobs/{job['id']}/promote", json={"task": "loop"}, timeout=600)
    assert r.status_code == 200, r.text
    # The gate replayed the task's recent traffic through serving with the candidate, as a temporary task.
    replayed = next(c for c in r.json()["gate"] if c["name"] == "replay")
    assert replayed["passed"] and replayed["detail"].startswith("8 recent requests replayed"), replayed
    assert any(t["task"] == "loop" for t in httpx.get(f"{serve.url}/admin/tasks", timeout=10).json()["tasks"])

    # A canary from the page's buttons' routes: the page test's adapter takes half of loop's sessions, then is
    # rolled back; serving reports it meanwhile.
    e2e = next(j for j in httpx.get(f"{platform.url}/api/jobs", timeout=10).json()["jobs"] if j["task"] == "e2e")
    r = httpx.post(f"{platform.url}/api/jobs/{e2e['id']}/promote", json={"task": "loop", "canary_share": 0.5},
                   timeout=300)
    assert r.status_code == 200, r.text
    loop = next(t for t in httpx.get(f"{serve.url}/admin/tasks", timeout=10).json()["tasks"] if t["task"] == "loop")
    assert loop["canary"]["share"] == 0.5 and Path(loop["canary"]["path"]).resolve() == Path(e2e["adapter_dir"]).resolve()
    assert httpx.delete(f"{platform.url}/api/tasks/loop/canary", timeout=60).status_code == 200
    loop = next(t for t in httpx.get(f"{serve.url}/admin/tasks", timeout=10).json()["tasks"] if t["task"] == "loop")
    assert loop["canary"] is None
    # Too few bad cases for a job: a clear refusal, nothing queued.
    r = httpx.post(f"{platform.url}/api/loop/dpo", json={"task": "other", "audit_db": str(work / "audit.db")},
                   timeout=60)
    assert r.status_code == 400 and "needs at least 4 pairs" in r.json()["error"]["message"], r.text


def test_a_job_survives_platform_restarts_and_resumes_after_a_crash(tmp_path):
    work = workdir_with_data(tmp_path / "w")
    platform = PlatformProcess(work)
    try:
        job_id = httpx.post(f"{platform.url}/api/jobs", content=TINY.format(task="resume", steps=16, save=4),
                            headers={"Content-Type": "application/yaml"}, timeout=30).json()["id"]
        wait_job(platform.url, job_id, lambda j: j["progress"]["step"] >= 2, timeout=240)
        # The platform alone dies: the run goes on, and the restarted platform finds it again.
        platform.kill()
        platform = PlatformProcess(work, port=platform.port)
        job = wait_job(platform.url, job_id, lambda j: j["progress"]["step"] >= 6, timeout=240)
        assert job["state"] == "running" and job["attempts"] == 1, job
        # The machine dies: the platform and the run with it. The restarted platform resumes the run.
        pid = int(_handle(work, job_id))
        os.killpg(pid, signal.SIGKILL)
        platform.kill()
        platform = PlatformProcess(work, port=platform.port)
        job = wait_job(platform.url, job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout=300)
        assert job["state"] == "succeeded" and job["attempts"] == 2, job
        log = httpx.get(f"{platform.url}/api/jobs/{job_id}/logs", timeout=30).text
        assert "resume: continuing from" in log and "attempt 2" in log, log[-3000:]
        assert job["progress"]["step"] == 16
    finally:
        platform.stop()


def _handle(work: Path, job_id: str) -> str:
    return open_store(work / "platform.db").get(job_id).handle


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_store_survives_reopening_and_a_job_is_claimed_once(backend, tmp_path, request):
    target = request.getfixturevalue("pg_url") if backend == "postgresql" else tmp_path / "jobs.db"
    a, b = open_store(target), open_store(target)  # two platform instances on one store
    job = Job(id="j-1", config={"run_dir": "r", "output_dir": "o"}, task="t")
    a.add(job)
    job.state, job.attempts, job.host = "running", 1, "a"
    assert [a.claim(job), b.claim(job)] == [True, False]  # the second instance finds it taken
    again = open_store(target).get("j-1")
    assert again.state == "running" and again.attempts == 1 and again.host == "a" and again.config == job.config
    # A watcher's save does not undo a cancel made meanwhile through the other instance.
    cancelled = b.get("j-1")
    cancelled.state = "cancelled"
    b.save(cancelled)
    job.peak_rss_bytes = 1
    assert a.save(job, if_state="running") is False and a.get("j-1").state == "cancelled"
    assert [j.id for j in a.list(("cancelled",), limit=None)] == ["j-1"] and a.list(("queued",)) == []


def test_admission_waits_for_memory_and_says_why():
    gib = 1 << 30
    big = Job(id="b", config={}, estimate_bytes=8 * gib)
    running = [Job(id="r", config={}, state="running", estimate_bytes=6 * gib, peak_rss_bytes=2 * gib)]
    why = reason_to_wait(big, running, max_running=2, available=12 * gib)
    assert why is not None and "needs 8.8 GiB" in why and "4.0 GiB held for running jobs" in why, why
    assert reason_to_wait(big, running, max_running=2, available=14 * gib) is None
    assert "limit is 1" in reason_to_wait(big, running, max_running=1, available=64 * gib)
    assert reason_to_wait(big, running, max_running=2, available=1, memory=False) is None  # a cluster places it
    assert "more than the 7.5 GiB this machine has" in never_fits(big, total=7.5 * gib)
    assert never_fits(big, total=16 * gib) is None
