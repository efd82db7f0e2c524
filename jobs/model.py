"""A job: a `train` config the platform runs, and what it knows of the run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED = ("succeeded", "failed", "cancelled")
MAX_SAMPLES = 600


@dataclass
class Job:
    id: str
    config: dict  # the train keys as validated, with paths resolved against the platform's directory
    state: State = "queued"
    task: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    estimate_bytes: int | None = None  # the estimator's predicted peak
    peak_rss_bytes: int | None = None  # measured, when the executor can see it
    rss_samples: list = field(default_factory=list)  # [seconds since start, bytes], thinned to MAX_SAMPLES
    waiting_for: str | None = None  # why a queued job has not started
    handle: str | None = None  # the executor's name for the run: a pid, a Kubernetes object
    host: str = ""  # the platform host that started it, which watches it
    attempts: int = 0  # starts; more than one: resumed after the platform lost it
    error: str | None = None
    exit_code: int | None = None
    stopped: bool = False  # a cancelled job's run has been stopped by its owner
    promoted: list[dict] = field(default_factory=list)  # {task, url, at, canary}

    def sample_rss(self, now: float, rss: int) -> None:
        self.peak_rss_bytes = max(self.peak_rss_bytes or 0, rss)
        self.rss_samples.append([round(now - (self.started or now), 1), rss])
        if len(self.rss_samples) > MAX_SAMPLES:
            self.rss_samples = self.rss_samples[::2]

    @property
    def run_dir(self) -> str:
        return str(self.config["run_dir"])

    @property
    def adapter_dir(self) -> str:
        return str(self.config["output_dir"])

    def doc(self) -> dict:
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict) -> "Job":
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**known)
