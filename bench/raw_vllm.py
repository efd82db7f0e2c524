"""vLLM's own OpenAI server as a child process: the baseline `bench/serve_bench.py` compares against.

Started with the engine settings guardtune's vLLM engine uses (serving/engines/vllm_engine.py): fp32
on CPU, the same max_num_seqs, max_model_len, LoRA slots and rank, and the same CPU thread binding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from serving.launcher import ChildServer, free_port


def _cpu_env(kv_cache_gb: float) -> dict[str, str]:
    n = os.cpu_count() or 1
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}" if n > 1 else "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(kv_cache_gb))), "HF_HUB_OFFLINE": "1"}


def server_args(base_dir: Path, *, max_num_seqs: int, max_model_len: int, loras: dict[str, Path] | None,
                max_loras: int = 4, max_lora_rank: int = 64) -> list[str]:
    """The command line; `loras` None starts an engine without LoRA."""
    args = ["--model", str(base_dir), "--served-model-name", "base", "--dtype", "float32", "--seed", "0",
            "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len)]
    if loras is not None:
        args += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank),
                 "--lora-modules", *(f"{name}={path}" for name, path in loras.items())]
    return args


class RawVLLMServer(ChildServer):
    ready_path = "/v1/models"

    def __init__(self, args: list[str], log_path: Path, *, kv_cache_gb: float = 2, ready_timeout: float = 600,
                 env: dict[str, str] | None = None):
        port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args, "--port", str(port),
               "--host", "127.0.0.1"]
        super().__init__(cmd, log_path, port, ready_timeout=ready_timeout,
                         env={**_cpu_env(kv_cache_gb), **(env or {})})
