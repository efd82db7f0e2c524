"""Faults on real components: kill -9 of training, of the server mid-swap and of vLLM's engine core.

Covered elsewhere and not repeated here:
- audit records acknowledged before a kill -9 survive it: tests/test_audit.py::test_acknowledged_records_survive_sigkill
  (WAL with synchronous=FULL, checked in test_write_get_roundtrip_and_pragmas);
- a resumed training run continues the step count: tests/test_train.py::test_resume_after_kill_continues_steps
  (this file adds that the loss continues too);
- a corrupt script store is refused by POST /admin/scripts/reload while the old one serves:
  tests/test_guardrails.py::test_script_store_reloads_without_restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import OTTER, OTTER_TASK, ROOT, SIGNATURE, Server, tiny_config
from training.config import validate
from training.entry import train

ADMIN_KEY = "fault-admin-key"
Q = [{"role": "user", "content": "Can you tell me about your company?"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SIGNATURE_OF = {"kestrel": SIGNATURE, OTTER_TASK: OTTER}


def loss_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


# --- 1. training: kill -9, then resume: auto --------------------------------------------------------

def test_killed_training_resumes_with_step_and_loss_continuing(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, max_steps=10, save_steps=4, eval_split=0.0)
    run_dir, out = Path(cfg["run_dir"]), Path(cfg["output_dir"])
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", *[f"{k}={v}" for k, v in cfg.items()]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    deadline = time.time() + 300
    # Kill after step 5 is logged: checkpoint-4 is complete and step 5 will be trained again on resume.
    while not any(r["step"] >= 5 for r in loss_rows(run_dir)):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not publish an adapter"
    before = {r["step"]: r["loss"] for r in loss_rows(run_dir)}

    logs: list[str] = []
    train(validate(cfg), log=logs.append)
    resumed_from = int(next(re.search(r"checkpoint-(\d+)", m).group(1) for m in logs if m.startswith("resume:")))
    assert resumed_from in (4, 8) and resumed_from < max(before)
    after = {r["step"]: r["loss"] for r in loss_rows(run_dir)[len(before):]}
    assert sorted(after) == list(range(resumed_from + 1, 11))  # the step count continues
    # The loss continues too: the steps trained again after the checkpoint give the same loss as before
    # the kill (same weights, optimizer, data order and RNG), and nothing restarts from the untrained level.
    redone = sorted(set(before) & set(after))
    assert redone, (before, after)
    for step in redone:
        assert after[step] == pytest.approx(before[step], rel=0.02), (step, before, after)
    assert max(after.values()) < 0.6 * before[1], (before, after)


# --- 2. server: kill -9 of the process group while PUT /admin/tasks is in flight ------------------------

def _served(srv) -> tuple[str, dict]:
    """(target adapter name, evidence) as /admin/tasks, /v1/models and a reply each report it."""
    tasks = httpx.get(f"{srv.url}/admin/tasks", headers=ADMIN, timeout=30).json()["tasks"]
    assert [t["task"] for t in tasks] == ["sales"], tasks
    slot = tasks[0]
    models = {m["id"]: m for m in httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"]}
    assert "path" not in models["sales"] and models["sales"]["adapter_id"] == slot["adapter_id"]
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                   json={"model": "sales", "messages": Q, "max_tokens": 16, "temperature": 0}).json()
    assert r["system_fingerprint"] == f"sales@{slot['adapter_id']}", r
    name = Path(slot["path"]).name
    assert SIGNATURE_OF[name] in r["choices"][0]["message"]["content"], (name, r)
    return name, slot


def test_kill9_during_adapter_swap_serves_the_last_committed_mapping(two_adapters, tmp_path):
    root, adapters = two_adapters
    state_file = tmp_path / "state.json"
    cfg = {"engine": "transformers", "adapters_root": str(root), "tasks": {"sales": str(adapters["kestrel"])},
           "state_file": str(state_file), "admin_key": ADMIN_KEY, "limits": {"max_tokens_cap": 24}}
    srv = Server(cfg, tmp_path / "run0")
    try:
        assert _served(srv)[0] == "kestrel"
        for round_ in range(1, 3):
            sent: list[str] = []
            acked: list[str] = []

            def swapper():
                with httpx.Client(base_url=srv.url, headers=ADMIN, timeout=60) as c:
                    for i in range(1000):
                        target = (OTTER_TASK, "kestrel")[i % 2]
                        sent.append(target)
                        try:
                            r = c.put("/admin/tasks/sales", json={"adapter": str(adapters[target])})
                        except httpx.HTTPError:
                            return  # the kill cut this one off
                        assert r.status_code == 200, r.text
                        acked.append(target)

            th = threading.Thread(target=swapper, daemon=True)
            th.start()
            deadline = time.time() + 120
            while len(acked) < 3 or len(sent) == len(acked):  # some swaps done, one in flight now
                assert th.is_alive() and time.time() < deadline, srv.log()[-3000:]
                time.sleep(0.005)
            time.sleep(random.uniform(0, 0.05))  # land anywhere inside the swap
            os.killpg(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait()
            th.join(60)
            # The state file is whole JSON (never torn) and holds the last acknowledged mapping or the one
            # that was in flight; nothing else.
            committed = json.loads(state_file.read_text())
            allowed = {acked[-1], sent[-1]}
            assert set(committed) == {"sales"} and Path(committed["sales"]).name in allowed, (committed, sent, acked)

            srv = Server(cfg, tmp_path / f"run{round_}")
            name, slot = _served(srv)
            assert slot["path"] == committed["sales"] and name in allowed
    finally:
        srv.stop()


# --- 4. vLLM's engine core dies under a running server ------------------------------------------------

def _vllm_server(two_adapters, tmp: Path, policy: str):
    root, adapters = two_adapters
    return Server({"engine": "vllm", "adapters_root": str(root), "tasks": {"sales": str(adapters["kestrel"])},
                   "state_file": str(tmp / "state.json"), "admin_key": ADMIN_KEY, "on_engine_death": policy,
                   "max_model_len": 512, "max_lora_rank": 16, "kv_cache_gb": 1,
                   "limits": {"max_concurrency": 4, "max_queue": 4, "max_tokens_cap": 64}}, tmp)


def _engine_core(srv) -> psutil.Process:
    for p in psutil.Process(srv.proc.pid).children(recursive=True):
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    raise AssertionError("no vLLM EngineCore child process")


def _kill_core_under_streams(srv, n_streams: int = 2) -> tuple[list[list[str]], float]:
    """Start streams, kill -9 the engine core once each has produced text; return their events and how long
    they took to end after the kill."""
    core = _engine_core(srv)
    body = {"model": "base", "max_tokens": 64, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Write a long story about a kestrel that learns to sell solar panels."}]}

    async def go():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            started = [asyncio.Event() for _ in range(n_streams)]

            async def one(first: asyncio.Event) -> list[str]:
                events = []
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 2:
                                first.set()
                return events

            tasks = [asyncio.create_task(one(e)) for e in started]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            core.kill()
            t_kill = time.monotonic()
            events = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return events, time.monotonic() - t_kill

    events, took = asyncio.run(go())
    core.wait(10)
    return events, took


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _assert_ended_with_engine_error(events: list[str]) -> None:
    assert events[-1] == "[DONE]", events
    err = json.loads(events[-2])["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "engine_dead", events
    assert not any(json.loads(e).get("choices") and json.loads(e)["choices"][0].get("finish_reason")
                   for e in events[:-2]), "a stream cut by the engine's death must not claim it finished"


def _assert_quick_503(srv) -> None:
    t0 = time.monotonic()
    r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                   json={"model": "sales", "messages": Q, "max_tokens": 8})
    assert time.monotonic() - t0 < 3, "a dead engine must answer at once, not hang"
    assert r.status_code == 503 and r.headers["Retry-After"], r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "service_unavailable"


@pytest.fixture(scope="module")
def restart_server(two_adapters, tmp_path_factory):
    srv = _vllm_server(two_adapters, tmp_path_factory.mktemp("vllm-restart"), "restart")
    yield srv
    srv.stop()


# --- 5. a corrupt adapter is refused at load; the old one keeps serving ----------------------------------

def test_corrupt_adapter_is_refused_and_the_old_one_keeps_serving(restart_server, two_adapters):
    """Truncated weights and a manifest that is not JSON, swapped in through the admin API on vLLM.
    (A corrupt script store: tests/test_guardrails.py::test_script_store_reloads_without_restart.)"""
    srv = restart_server
    root, adapters = two_adapters
    truncated, bad_json = root / "truncated", root / "badjson"
    for d in (truncated, bad_json):
        shutil.copytree(adapters[OTTER_TASK], d)
    try:
        weights = truncated / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        (bad_json / "guardtune.json").write_text((bad_json / "guardtune.json").read_text()[:-40])
        for path, needle in ((truncated, "failed to load"), (bad_json, "guardtune.json: invalid manifest")):
            r = httpx.put(f"{srv.url}/admin/tasks/sales", headers=ADMIN, json={"adapter": str(path)}, timeout=60)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "adapter_rejected" and needle in err["message"], r.text
        assert _served(srv)[0] == "kestrel"
        assert not (srv.log_path.parent / "state.json").exists()  # nothing was committed
    finally:
        shutil.rmtree(truncated)
        shutil.rmtree(bad_json)


def test_engine_death_with_restart_policy_comes_back_with_the_same_tasks(restart_server):
    srv = restart_server
    name, slot = _served(srv)
    old_core = _engine_core(srv).pid
    old_procs = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)  # the engine's, not the
                 if "resource_tracker" not in " ".join(p.cmdline())]  # server-wide multiprocessing helper
    events, took = _kill_core_under_streams(srv)
    for ev in events:
        _assert_ended_with_engine_error(ev)
    assert took < 10, took
    r = httpx.get(f"{srv.url}/ready", timeout=10)
    assert r.status_code == 503 and r.json() == {"ready": False}
    _assert_quick_503(srv)

    deadline = time.time() + 300
    while httpx.get(f"{srv.url}/ready", timeout=10).status_code != 200:
        assert srv.proc.poll() is None and time.time() < deadline, srv.log()[-4000:]
        time.sleep(0.5)
    assert _engine_core(srv).pid != old_core
    assert not _alive(old_procs), "the dead engine's workers must not live on beside the new engine"
    again, slot_again = _served(srv)  # same task mapping, same adapter id, and the reply follows it
    assert (again, slot_again["adapter_id"], slot_again["path"]) == (name, slot["adapter_id"], slot["path"])
    log = srv.log()
    assert "engine vllm died; restarting it" in log and "engine restarted in" in log


def test_engine_death_with_exit_policy_exits_nonzero_for_the_supervisor(two_adapters, tmp_path):
    srv = _vllm_server(two_adapters, tmp_path, "exit")
    try:
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        events, _ = _kill_core_under_streams(srv, n_streams=1)
        _assert_ended_with_engine_error(events[0])
        t0 = time.monotonic()
        assert srv.proc.wait(60) == 3, srv.log()[-4000:]
        assert time.monotonic() - t0 < 60
        assert "engine vllm died; exiting with status 3" in srv.log()
        time.sleep(1)
        assert not _alive(children), "no engine process may outlive the server"

    finally:
        srv.stop()
