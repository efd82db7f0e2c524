"""A submitted body -> a validated job: `train`'s own schema decides, every problem listed at once.

The body is JSON, `{"config": {...}, "overrides": ["key=value", ...]}`, or a YAML mapping of train
keys. Paths are relative to the platform's working directory. Each job gets its own run and adapter
directories unless the config names them, so two jobs of one task never write over each other.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import yaml

from jobs.model import Job
from kernel.errors import GuardtuneError
from training import memory_mode
from training.config import parse_overrides, resolve_paths, validate

PATH_KEYS = ("output_dir", "run_dir")


class BadJob(GuardtuneError):
    """The config does not validate: `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_body(body: bytes, content_type: str) -> dict:
    """The raw train keys of a request body."""
    try:
        if "yaml" in content_type:
            raw = yaml.safe_load(body.decode("utf-8") or "{}")
            if not isinstance(raw, dict):
                raise BadJob(["the YAML body must be a mapping of train keys"])
            return raw
        doc = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise BadJob([f"the body is not valid {'YAML' if 'yaml' in content_type else 'JSON'}: "
                      f"{str(exc).splitlines()[0]}"]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config", {}), dict) \
            or not isinstance(doc.get("overrides", []), list):
        raise BadJob(['expected {"config": {<train keys>}, "overrides": ["key=value", ...]}'])
    raw = dict(doc.get("config") or {})
    try:
        raw.update(parse_overrides([str(o) for o in doc.get("overrides") or []]))
    except GuardtuneError as exc:
        raise BadJob([str(exc)]) from None
    return raw


def new_id() -> str:
    return time.strftime("j-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def make_job(raw: dict, workdir: Path, *, device: str) -> Job:
    """A queued job, or BadJob with every problem."""
    job_id = new_id()
    raw = dict(raw)
    resolve_paths(raw, workdir)
    task = str(raw.get("task") or "default")
    for key, default in (("run_dir", f"runs/{job_id}"), ("output_dir", f"adapters/{task}-{job_id}")):
        if not raw.get(key):  # absent, null or empty: the job's own directory
            raw[key] = default
        raw[key] = str((workdir / str(raw[key])).resolve())  # an absolute path stays as it is
    outside = [f"{k} {raw[k]}: must be under the platform's directory {workdir}" for k in PATH_KEYS
               if not Path(raw[k]).is_relative_to(workdir.resolve())]
    if outside:
        raise BadJob(outside)
    problems_of(raw)
    return Job(id=job_id, config=raw, task=task, estimate_bytes=predicted_peak(raw, device))


def problems_of(raw: dict) -> None:
    """Raise BadJob with the schema's problems and any data file that is not there."""
    problems = [f"{key} {raw[key]}: no such file" for key in ("train_file", "eval_file")
                if raw.get(key) and not Path(str(raw[key])).is_file()]
    try:
        validate(dict(raw), source="job")
    except GuardtuneError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        problems += lines[1:] if len(lines) > 1 else lines
    if problems:
        raise BadJob(problems)


def predicted_peak(raw: dict, device: str) -> int | None:
    """The estimator's peak in bytes, as `train`'s own `host_memory: auto` sees it; None when it cannot say."""
    try:
        return memory_mode.predicted_peak(validate(dict(raw), source="job"), device)
    except GuardtuneError:
        return None
