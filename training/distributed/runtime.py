"""Inside one rank: who am I, how the Trainer shards, and how the adapter is saved complete.

Under ZeRO-3 (even with one process) and FSDP every parameter is partitioned, so the PEFT model's
own `save_pretrained` would write empty tensors. The adapter is saved through the Trainer, which
gathers the full state dict on rank 0 first; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.fsutil import atomic_dir
from training.adapters import load_adapter
from training.distributed.ds_config import deepspeed_path

RESUME_ENV = "GUARDTUNE_RESUME_FROM"  # set by the launcher, which already chose the checkpoint
# accelerate sets a one-process CPU run to no distribution at all, and then there is nothing to shard across.
FSDP_CPU_NEEDS_2 = "fsdp on CPU shards across processes: set nproc=2 or more (ranks talk over gloo)"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a rank started by torchrun or the deepspeed launcher."""
    return "LOCAL_RANK" in os.environ


def resume_from_launcher() -> tuple[bool, Path | None]:
    """(the launcher decided, its checkpoint or None)."""
    if RESUME_ENV not in os.environ:
        return False, None
    value = os.environ[RESUME_ENV]
    return True, Path(value) if value else None


def decoder_layer_class(model) -> str:
    """The block that holds attention and MLP: FSDP's unit of wrapping."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = sorted(getattr(base, "_no_split_modules", None) or [])
    if len(names) == 1:
        return names[0]
    for name, module in base.named_modules():
        if name.endswith("layers.0"):
            return type(module).__name__
    raise RuntimeError("fsdp: cannot find the model's decoder layer class to wrap")


def training_arguments(cfg, model, kwargs: dict) -> dict:
    """TrainingArguments kwargs with the process group backend and DeepSpeed or FSDP switched on."""
    if not (cfg.distributed or launched()):
        return kwargs
    import torch

    kwargs = dict(kwargs)
    cuda = torch.cuda.is_available()
    kwargs["ddp_backend"] = "nccl" if cuda else "gloo"
    if not cuda and not cfg.deepspeed:
        kwargs["use_cpu"] = True  # without it accelerate sees no process group on CPU and each rank trains alone
    if cfg.deepspeed:
        kwargs["deepspeed"] = json.loads(deepspeed_path(cfg.deepspeed).read_text())
        if not cuda:
            _cpu_deepspeed_state()
            kwargs["accelerator_config"] = {"use_configured_state": True}
    elif cfg.fsdp:
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": [decoder_layer_class(model)],
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",  # save_model gathers it on rank 0
            # FSDP's own, shard-aware checkpointing instead of the Trainer's (they cannot be combined)
            "activation_checkpointing": bool(kwargs.get("gradient_checkpointing")),
        }
        kwargs["gradient_checkpointing"] = False
    elif world_size() > 1:
        kwargs["ddp_find_unused_parameters"] = False  # frozen base weights are not "unused"
    return kwargs


def cpu_fsdp(trainer) -> None:
    """Switch FSDP on for a CPU run, after the Trainer made its Accelerator and before it wraps the model.

    accelerate 1.15 (state.py:986-1016, AcceleratorState.__init__) sets DistributedType.FSDP and keeps
    the plugin only for MULTI_GPU-like types: on CPU (MULTI_CPU) it drops the plugin and the run would
    be plain DDP. torch's FSDP2 `fully_shard` itself shards on a CPU mesh over gloo, so the state is
    given the plugin built from the same TrainingArguments; the Trainer then prepares, trains and
    saves (full state dict gathered on rank 0) exactly as it does on CUDA.
    """
    import torch

    if not trainer.args.fsdp or trainer.is_fsdp_enabled or torch.cuda.is_available():
        return
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise GuardtuneError(f"{FSDP_CPU_NEEDS_2}; accelerate sees {state.distributed_type.value}")
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    # Every later AcceleratorState() copies PartialState's fields back in (state.py:919), so both record
    # FSDP; accelerate treats FSDP like MULTI_CPU for barriers and, on CPU tensors, for collectives.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def report_shards(trainer) -> None:
    """Each rank states, once the model is wrapped, how much of the trainable weights it holds.

    Printed to the rank's own stderr (launch/<run>/attempt_0/<rank>/stderr.log), so a run that
    silently fell back to unsharded DDP is visible at once.
    """
    if not trainer.is_fsdp_enabled:
        return
    import sys

    from transformers import TrainerCallback

    class ShardReport(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from torch.distributed.tensor import DTensor

            params = [p for p in model.parameters() if p.requires_grad]
            dtensors = [p for p in params if isinstance(p, DTensor)]
            local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
            full = sum(p.numel() for p in params)
            print(f"fsdp: rank {rank()} of {world_size()}: {len(dtensors)}/{len(params)} trainable tensors sharded "
                  f"(DTensor), holds {local}/{full} trainable values", file=sys.stderr, flush=True)

    trainer.add_callback(ShardReport())


def _cpu_deepspeed_state() -> None:
    """The process group for DeepSpeed on CPU, made before TrainingArguments.

    For DeepSpeed, TrainingArguments gives accelerate no backend. On CPU accelerate then finds none,
    records a world of 1, and does not split the data between ranks. DeepSpeed itself still sees 2.
    A PartialState made here with gloo is the one that TrainingArguments then uses.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def resolved(args):
    """Refill the DeepSpeed "auto" values now that the process group (and so the world size) exists.

    transformers 5.19 fills them inside TrainingArguments before it creates the process group, so
    train_batch_size is computed for a world of 1 and DeepSpeed rejects it on 2+ ranks.
    """
    if args.deepspeed and args.world_size > 1:
        from accelerate.utils import DeepSpeedPlugin
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)  # the preset, "auto" values intact
        args.hf_deepspeed_config.trainer_config_process(args)
        args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
    return args


def sharded(trainer) -> bool:
    return bool(trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def broadcast(value):
    """Rank 0's value on every rank."""
    if not _group_ready() or world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def save_adapter(trainer, adapter_dir: Path, save_weights, finish) -> None:
    """Publish the adapter atomically from rank 0, gathering sharded weights from every rank first.

    `save_weights(tmp)` is the single-process save; `finish(tmp)` adds the manifest on rank 0
    before the directory is renamed into place.
    """
    if not (sharded(trainer) or world_size() > 1):
        with atomic_dir(adapter_dir) as tmp:
            save_weights(tmp)
            finish(tmp)
        return
    main = is_main()
    with atomic_dir(adapter_dir) if main else contextlib.nullcontext() as tmp:
        tmp = broadcast(str(tmp) if main else None)  # every rank joins the gather into rank 0's staging dir
        trainer.save_model(tmp)
        if main:
            Path(tmp, "training_args.bin").unlink(missing_ok=True)  # a pickle serving has no use for
            finish(Path(tmp))
    barrier()  # no rank leaves before the adapter is in place


def generation_model(trainer, model, adapter_dir: Path):
    """A model that can generate: sharded weights are unusable outside the engine, so reload the adapter."""
    if not sharded(trainer):
        return model
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Training is over. Left set, ZeRO-3's global config would make this rank-0-only load partition the
    # weights across ranks that are not loading, and the run would die after its adapter was written.
    unset_hf_deepspeed_config()

    return load_adapter(adapter_dir)[2]


def finish() -> None:
    """All ranks meet before exit, so none is torn down while another still writes."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
