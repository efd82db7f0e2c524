"""Open a published artifact the way serving will: manifest first, then its base, hash-checked.

A PEFT artifact (LoRA family, prompt/prefix/p-tuning, llama_adapter) loads as a PeftModel on its
full-precision base; a full-model artifact (full, freeze) loads as itself, with a `disable_adapter()`
that switches it to its base's weights, so eval and comparisons work the same for every method.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.manifest import Manifest, resolve_manifest_base

_BASE_DIR = "guardtune_base_dir"
_BASE_PARAMS = "_guardtune_base_params"


def load_adapter(adapter_dir: str | Path):
    """(manifest, tokenizer, model): a PeftModel, or for a full-model artifact the tuned model itself."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    manifest = Manifest.read(adapter_dir)
    base_dir = resolve_manifest_base(manifest)
    if manifest.is_full_model:
        if not (adapter_dir / "config.json").is_file():
            raise GuardtuneError(f"{adapter_dir}: a {manifest.method} model directory without config.json")
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        tokenizer.chat_template = manifest.chat_template
        model = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32)
        remember_base(model, base_dir)
        return manifest, tokenizer, model
    if not (adapter_dir / "adapter_config.json").is_file():
        raise GuardtuneError(f"{adapter_dir}: no adapter_config.json")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = manifest.chat_template
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return manifest, tokenizer, model


def remember_base(model, base_dir) -> None:
    """Give a full model the PeftModel-style `disable_adapter()` context, so eval and the base-vs-tuned
    comparisons treat every method alike: inside it the model computes with its base's weights.

    The swap re-points each parameter's data (no copy, tied weights stay tied); the base weights are
    loaded on first use and kept outside the module tree, so they are never saved or trained.
    """
    import torch

    @contextlib.contextmanager
    def disable_adapter():
        base = model.__dict__.get(_BASE_PARAMS)
        if base is None:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            base = {n: p.data for n, p in loaded.named_parameters()}
            model.__dict__[_BASE_PARAMS] = base
        params = dict(model.named_parameters())
        if set(params) != set(base):
            raise GuardtuneError(f"{base_dir} does not have this model's parameters; cannot compare with it")
        saved = {n: p.data for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data = base[n].to(device=p.device, dtype=p.dtype)
            yield model
        finally:
            for n, p in params.items():
                p.data = saved[n]

    model.__dict__["disable_adapter"] = disable_adapter
    model.__dict__[_BASE_DIR] = str(base_dir)
