"""Inference engines behind one interface: vLLM (default) and plain transformers (fallback by config).

A vLLM server routes the adapters vLLM cannot serve (DoRA, prompt methods) to a transformers engine
started beside it when first needed (routed.py). Each engine imports its library when it starts.
"""

from __future__ import annotations

from serving.engines.base import Engine
from serving.engines.hf_engine import TransformersEngine
from serving.engines.routed import RoutedEngine
from serving.engines.vllm_engine import VLLMEngine


def make_engine(cfg, base_dir) -> Engine:
    if cfg.engine == "vllm":
        # Beside vLLM on CPU: on a GPU, vLLM has reserved the memory (gpu_memory_utilization) for itself.
        return RoutedEngine(VLLMEngine(cfg, base_dir), lambda: TransformersEngine(cfg, base_dir, device="cpu"))
    return TransformersEngine(cfg, base_dir)
