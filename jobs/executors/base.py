"""What the queue asks of an executor, and what a run's state looks like to it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jobs.model import Job


@dataclass
class RunState:
    state: str  # "running" | "succeeded" | "failed" | "lost" (no such run: the queue starts it again)
    exit_code: int | None = None
    peak_rss_bytes: int | None = None
    rss_bytes: int | None = None


class Executor(Protocol):
    name: str
    admits_by_memory: bool  # the queue checks the host's free memory before starting a job

    def start(self, job: Job) -> str: ...  # the run's handle

    def state(self, job: Job) -> RunState: ...

    def cancel(self, job: Job) -> None: ...

    def log_path(self, job: Job) -> Path: ...  # the run's log, as far as it is known here
