"""A vLLM general plugin: on CPU, LoRA at base-model speed (docs/lora-cpu.md).

Registered as the `vllm.general_plugins` entry point `guardtune_lora_cpu`, so vLLM runs `register`
in every process it starts, the engine core included. It swaps the CPU punica wrapper's LoRA ops for
the grouped matmuls in `ops`, only on CPU and only on the vLLM versions they were checked against;
elsewhere it logs that it is off and why. GUARDTUNE_LORA_CPU=0 turns it off (for comparisons).
"""

from __future__ import annotations

import logging
import os

import vllm
from vllm.platforms import current_platform

log = logging.getLogger("vllm.guardtune_lora_cpu")  # under vLLM's logger, so its handler prints it

CHECKED = ("0.32.0",)  # vLLM versions whose torch_ops signatures and semantics ops.py was tested against
ENV = "GUARDTUNE_LORA_CPU"


def why_off() -> str | None:
    """None when the plugin should act; otherwise the reason it stays off."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return f"{ENV}={os.environ[ENV]}"
    if vllm.__version__ not in CHECKED:
        return f"vLLM {vllm.__version__} is not one it was checked against ({', '.join(CHECKED)})"
    if not current_platform.is_cpu():
        return f"the platform is {current_platform.device_name}, not CPU (GPU kernels need no help)"
    return None


def register() -> None:
    reason = why_off()
    if reason:
        log.info("guardtune LoRA CPU ops off: %s", reason)
        return
    # Imported only once the version is checked: the module paths it patches are version-specific.
    from serving.engines.lora_cpu import patch  # lazy: loads vllm; its module paths exist only on checked versions

    patch.apply()
    log.info("guardtune LoRA CPU ops on: grouped matmuls per adapter (vLLM %s)", patch.vllm_version())
