"""One small metric-logger interface with independent backends (console, JSONL file, SwanLab).

The trainer talks to a FanOut of these and never to a tracking library directly, so a backend
can be added or switched off without touching training code.
"""

from __future__ import annotations

import json
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from kernel.fsutil import atomic_write_text

SWANLAB_ID = "guardtune_experiment_id"


class MetricLogger(Protocol):
    def log_config(self, config: dict[str, Any]) -> None: ...
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class ConsoleLogger:
    """One human line per logging step: step, loss, lr, tokens/s."""

    def __init__(self, total_steps: int, stream=sys.stderr):
        self.total, self.stream = total_steps, stream

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        order = ("loss", "eval_loss", "learning_rate", "tokens_per_s", "grad_norm", "s_per_step")
        parts = [f"{k} {_fmt(metrics[k])}" for k in order if k in metrics]
        if parts:
            print(f"step {step}/{self.total}  " + "  ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends every record to metrics.jsonl in the run dir: the durable, greppable history."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_config(self, config: dict[str, Any]) -> None:
        self._write({"config": config, "time": time.time()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, **metrics, "time": time.time()})

    def _write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    def close(self) -> None:
        pass


class SwanLabLogger:
    """SwanLab in local mode: no network; `swanlab watch LOGDIR` serves the dashboard.

    The experiment id is kept in LOGDIR, so a resumed run continues the same experiment.
    """

    def __init__(self, logdir: Path, project: str, run_name: str):
        import swanlab

        self._swanlab = swanlab
        self.run = swanlab.init(project=project, name=run_name, mode="local", log_dir=str(logdir),
                                id=experiment_id(Path(logdir)), resume="allow")

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._swanlab.log({f"train/{k}" if not k.startswith("eval") else f"eval/{k}": v for k, v in metrics.items()},
                          step=step)

    def close(self) -> None:
        self._swanlab.finish()


def experiment_id(logdir: Path) -> str:
    """The SwanLab experiment id recorded in logdir, made (SwanLab's form: 21 of [a-z0-9]) on first use."""
    path = logdir / SWANLAB_ID
    if path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(21))
    atomic_write_text(path, run_id)
    return run_id


class FanOut:
    def __init__(self, *backends: MetricLogger):
        self.backends = list(backends)

    def log_config(self, config: dict[str, Any]) -> None:
        for b in self.backends:
            b.log_config(config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for b in self.backends:
            b.log(metrics, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def _fmt(v: float) -> str:
    if isinstance(v, float) and (abs(v) < 1e-3 and v != 0):
        return f"{v:.2e}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
