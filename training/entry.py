"""`train(cfg)`: the one entry for every stage; `train`, `guardtune train` and the launched ranks come here."""

from __future__ import annotations

from pathlib import Path

from training import dpo, sft
from training.config import TrainConfig
from training.distributed import runtime as dist
from training.host_memory import configure
from training.memory_mode import resolve
from training.run import execute

STAGES = {"sft": sft, "pt": sft, "dpo": dpo}  # each builds its dataset and trainer; run.py does the rest


def train(cfg: TrainConfig, *, log=print) -> Path:
    import torch

    on_cpu = not torch.cuda.is_available()
    mode, why = resolve(cfg, on_cpu=on_cpu)
    done = configure(mode, on_cpu=on_cpu)
    if dist.is_main() and on_cpu:
        log((done or f"host memory: {mode}") + (f" ({why})" if why else ""))
    return execute(cfg, STAGES[cfg.stage], log=log)
