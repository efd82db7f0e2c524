"""Installs the plugin: `ops` in place of vLLM's CPU LoRA torch ops, where the CPU punica wrapper looks
them up, and `wrapper`'s per-step grouping on the wrapper itself."""

from __future__ import annotations

import vllm
from vllm.lora.ops import torch_ops
from vllm.lora.punica_wrapper import punica_cpu

from serving.engines.lora_cpu import ops, wrapper

# punica_cpu imported the functions by name, so its module namespace is what its methods call.
TARGETS = (punica_cpu, torch_ops)
METHODS = {"update_metadata": wrapper.update_metadata, "add_lora_linear": wrapper.add_lora_linear}


def apply() -> None:
    for module in TARGETS:
        for name in ops.OPS:
            setattr(module, name, getattr(ops, name))
    for name, fn in METHODS.items():
        setattr(punica_cpu.PunicaWrapperCPU, name, fn)


def active() -> bool:
    return all(getattr(m, n) is getattr(ops, n) for m in TARGETS for n in ops.OPS) and \
        all(getattr(punica_cpu.PunicaWrapperCPU, n) is fn for n, fn in METHODS.items())


def vllm_version() -> str:
    return vllm.__version__
