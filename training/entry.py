"""`train(cfg)`: the one entry for every stage; `train`, `guardtune train` and the launched ranks come here."""

from __future__ import annotations

from pathlib import Path

from training import dpo, sft
from training.config import TrainConfig
from training.distributed import runtime as dist
from training.host_memory import configure
from training.run import execute

STAGES = {"sft": sft, "pt": sft, "dpo": dpo}  # each builds its dataset and trainer; run.py does the rest


def train(cfg: TrainConfig, *, log=print) -> Path:
    import torch

    done = configure(cfg.host_memory, on_cpu=not torch.cuda.is_available())
    if done and dist.is_main():
        log(done)
    return execute(cfg, STAGES[cfg.stage], log=log)
