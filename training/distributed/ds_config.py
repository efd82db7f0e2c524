"""The DeepSpeed JSON for a config: a shipped preset or the user's file, checked against the config.

The presets leave batch sizes, clipping and precision as "auto", which the HF Trainer fills from
TrainingArguments; a user's file that hard-codes them must agree, or DeepSpeed fails late and long.
"""

from __future__ import annotations

import json
from pathlib import Path

from kernel.errors import GuardtuneError

PRESETS_DIR = Path(__file__).resolve().parent


def deepspeed_path(name: str) -> Path:
    if name.endswith(".json"):
        return Path(name)
    return PRESETS_DIR / f"ds_{name}.json"


def check_deepspeed(cfg, world_size: int) -> dict:
    """Parse the config's DeepSpeed JSON and check it against batch_size, grad_accum and world size."""
    path = deepspeed_path(cfg.deepspeed)
    if not path.is_file():
        raise GuardtuneError(f"deepspeed {path}: no such file")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GuardtuneError(f"deepspeed {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(conf, dict):
        raise GuardtuneError(f"deepspeed {path}: expected a JSON object")
    zero = conf.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise GuardtuneError(f"deepspeed {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    expect = {"train_micro_batch_size_per_gpu": (cfg.batch_size, "batch_size"),
              "gradient_accumulation_steps": (cfg.grad_accum, "grad_accum"),
              "train_batch_size": (cfg.batch_size * cfg.grad_accum * world_size,
                                   f"batch_size x grad_accum x world size ({world_size})")}
    for key, (want, what) in expect.items():
        got = conf.get(key, "auto")
        if got != "auto" and got != want:
            raise GuardtuneError(f"deepspeed {path}: {key} is {got} but {what} gives {want}; "
                                 f'set it to "auto" or {want}')
    if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise GuardtuneError(f"deepspeed {path}: ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save: "
                             "true, or the adapter is saved from empty partitions")
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if offload and "optimizer" not in conf and conf.get("zero_force_ds_cpu_optimizer", True):
        raise GuardtuneError(f"deepspeed {path}: offload_optimizer with the Trainer's torch AdamW needs "
                             "zero_force_ds_cpu_optimizer: false (DeepSpeed's own CPU Adam is a compiled op)")
    return conf
