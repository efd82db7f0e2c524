"""What a job's run shows while it runs: curves, tokens/s and ETA, from train's metrics.jsonl and log."""

from __future__ import annotations

import json
import re
from pathlib import Path

MAX_POINTS = 2000  # a curve is thinned to about this many points
_STEP = re.compile(rb"step (\d+)/(\d+)")


def read(run_dir: str | Path, log_path: Path | None = None, config: dict | None = None) -> dict:
    """{"step", "total_steps", "loss", "eval_loss", "tokens_per_s", "learning_rate" (curves of [step, value]),
    "tokens_per_s_now", "eta_s"}."""
    curves: dict[str, list] = {"loss": [], "eval_loss": [], "tokens_per_s": [], "learning_rate": []}
    step, times = 0, []
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the line being written
        if "step" not in rec:
            continue
        step = max(step, int(rec["step"]))
        for key in curves:
            if isinstance(rec.get(key), (int, float)):
                points = curves[key]
                if points and points[-1][0] == rec["step"]:
                    points.pop()  # the end of training logs the last eval again: one point per step
                points.append([rec["step"], rec[key]])
        if "loss" in rec and "s_per_step" in rec:
            times.append(rec["s_per_step"])
    total = _total_steps(log_path) or int((config or {}).get("max_steps") or 0) or None
    recent = times[-10:]
    eta = (total - step) * sum(recent) / len(recent) if total and recent and step < total else (0.0 if total and
                                                                                                 step >= total else None)
    return {"step": step, "total_steps": total, **{k: _thin(v) for k, v in curves.items()},
            "tokens_per_s_now": curves["tokens_per_s"][-1][1] if curves["tokens_per_s"] else None, "eta_s": eta}


def _total_steps(log_path: Path | None) -> int | None:
    """The N of train's last "step i/N" line (its console logger), from the log's tail."""
    if log_path is None:
        return None
    try:
        with log_path.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(fh.tell() - 65536, 0))
            found = _STEP.findall(fh.read())
    except OSError:
        return None
    return int(found[-1][1]) if found else None


def _thin(points: list) -> list:
    if len(points) <= MAX_POINTS:
        return points
    every = -(-len(points) // MAX_POINTS)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
