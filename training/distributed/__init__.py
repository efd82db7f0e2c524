"""Multi-process training: DeepSpeed/FSDP configs, launch planning, and the in-process rank helpers.

`train` never spawns training processes itself: `launch.py` runs torchrun (or prints the deepspeed
launcher command), and every rank re-runs `training.cli` with the same config.
"""
