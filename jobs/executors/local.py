"""Jobs as subprocesses on this machine, each in its own session (so a cancel reaches torchrun's ranks too).

Each job has a directory under the platform's `jobs/`: config.yaml, log.txt (the run's stdout and
stderr) and, at the end, exit.json (runner.py). A run is found again after a restart of the platform
by its pid and its command line, so a platform restart does not disturb a job that is still running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from jobs.executors.base import RunState
from jobs.model import Job


class LocalExecutor:
    name = "local"
    admits_by_memory = True

    def __init__(self, jobs_dir: Path, workdir: Path, env: dict | None = None):
        self.jobs_dir, self.workdir = jobs_dir, workdir
        keys = ("GUARDTUNE_ADMIN_KEY", "GUARDTUNE_SERVE_ADMIN_KEY")  # a training run needs neither
        self.env = {**{k: v for k, v in os.environ.items() if k not in keys}, "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self._children: dict[int, subprocess.Popen] = {}

    def job_dir(self, job: Job) -> Path:
        return self.jobs_dir / job.id

    def start(self, job: Job) -> str:
        d = self.job_dir(job)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(yaml.safe_dump(job.config, sort_keys=False))
        (d / "exit.json").unlink(missing_ok=True)
        with (d / "log.txt").open("ab") as log:
            if job.attempts > 1:  # the queue counts this start already
                log.write(f"\n[platform] attempt {job.attempts}: resuming (resume: auto)\n".encode())
            proc = subprocess.Popen([sys.executable, "-m", "jobs.runner", str(d)], cwd=self.workdir, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self._children[proc.pid] = proc
        return str(proc.pid)

    def state(self, job: Job) -> RunState:
        d = self.job_dir(job)
        pid = int(job.handle) if job.handle else None
        child = self._children.get(pid)
        code = child.poll() if child is not None else None  # reaps it once it exits
        done = _read_json(d / "exit.json")
        if done is None and pid is not None and _is_runner(pid, d):
            return RunState("running", rss_bytes=_rss(pid))
        done = done or _read_json(d / "exit.json")  # it may have finished between the two looks
        if done is not None:
            self._children.pop(pid, None)
            return RunState("succeeded" if done.get("code") == 0 else "failed", done.get("code"),
                            done.get("peak_rss_bytes"))
        if code is not None:  # our child, killed before it could write its record (a signal: the OOM killer?)
            self._children.pop(pid, None)
            return RunState("failed", code)
        return RunState("lost")

    def cancel(self, job: Job, grace_s: float = 10.0) -> None:
        pid = int(job.handle) if job.handle else None
        if pid is None or not _is_runner(pid, self.job_dir(job)):
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.time() + wait
            while time.time() < deadline:
                if pid in self._children and self._children[pid].poll() is not None:
                    return
                if not _is_runner(pid, self.job_dir(job)):
                    return
                time.sleep(0.1)

    def log_path(self, job: Job) -> Path:
        return self.job_dir(job) / "log.txt"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_runner(pid: int, job_dir: Path) -> bool:
    """The pid is alive (not a zombie) and runs this job's runner, not a process that reused the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and str(job_dir).encode() in cmdline


def _rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
