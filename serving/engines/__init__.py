"""Inference engines behind one interface: vLLM (default) and plain transformers (fallback by config)."""

from __future__ import annotations


def make_engine(cfg, base_dir):
    if cfg.engine == "vllm":
        from serving.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, base_dir)
    from serving.engines.hf_engine import TransformersEngine

    return TransformersEngine(cfg, base_dir)
