"""`guardtune export ADAPTER --merge OUT`: fold a LoRA-family adapter into its full-precision base."""

from __future__ import annotations

import shutil
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.fsutil import atomic_dir
from kernel.manifest import FULL_METHODS, LORA_METHODS, Manifest, resolve_manifest_base
from training.adapters import load_adapter


def merge(adapter_dir: str | Path, out: str | Path, *, log=print) -> Path:
    method = Manifest.read(adapter_dir).method
    if method in FULL_METHODS:
        raise GuardtuneError(f"{adapter_dir} ({method}) is already a full model: serve or copy it as it is "
                             "(e.g. `base_model: <dir>` in the serve config); --merge only folds LoRA adapters")
    if method not in LORA_METHODS:
        raise GuardtuneError(f"{adapter_dir} ({method}) cannot be merged: {method} adds virtual tokens or "
                             "attention prompts, not weight deltas; serve it with `engine: transformers`")
    manifest, tokenizer, model = load_adapter(adapter_dir)
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        base_dir = resolve_manifest_base(manifest)
        if (base_dir / "generation_config.json").is_file():
            shutil.copy(base_dir / "generation_config.json", tmp / "generation_config.json")
    log(f"export: merged {adapter_dir} ({manifest.method} r={manifest.rank}) into {out}")
    return Path(out)
