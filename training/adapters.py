"""Open a published adapter the way serving will: manifest first, then its base, hash-checked."""

from __future__ import annotations

from pathlib import Path

from guardtune.errors import GuardtuneError
from guardtune.manifest import Manifest, resolve_manifest_base


def load_adapter(adapter_dir: str | Path):
    """(manifest, tokenizer, PeftModel) on a full-precision base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    manifest = Manifest.read(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise GuardtuneError(f"{adapter_dir}: no adapter_config.json")
    base_dir = resolve_manifest_base(manifest)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = manifest.chat_template
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return manifest, tokenizer, model
