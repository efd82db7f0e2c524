"""Where a run continues from: `resume: auto` picks the newest complete checkpoint of the same config.

The run dir records the config's fingerprint, so a checkpoint is never resumed under another config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.fsutil import atomic_write_text

RUN_STATE = "guardtune_run.json"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint that finished writing; a kill mid-save leaves one without trainer_state.json.

    PEFT runs checkpoint adapter_model.*; full/freeze runs checkpoint the whole model (model*.safetensors).
    """
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for ckpt in reversed(ckpts):
        weights = [*ckpt.glob("adapter_model.*"), *ckpt.glob("model*.safetensors"), *ckpt.glob("pytorch_model*.bin")]
        if (ckpt / "trainer_state.json").is_file() and weights:
            return ckpt
    return None


def resume_point(cfg, run_dir: Path, log, *, writer: bool) -> Path | None:
    """The checkpoint to resume from, or None; `resume: never` clears the run dir first.

    Only the `writer` (rank 0, or the launcher) clears the dir and records the config.
    """
    state = run_dir / RUN_STATE
    ckpt = latest_checkpoint(run_dir) if cfg.resume == "auto" else None
    if ckpt is not None:
        recorded = json.loads(state.read_text()).get("fingerprint") if state.is_file() else None
        if recorded != cfg.fingerprint():
            raise GuardtuneError(
                f"{run_dir} holds checkpoints of a different config; set run_dir to a new directory "
                "or resume=never to start over there"
            )
        log(f"resume: continuing from {ckpt}")
    elif cfg.resume == "never" and run_dir.exists() and writer:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if writer:
        atomic_write_text(state, json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.model_dump(mode="json")},
                                            indent=2))
    return ckpt
