"""The base model a run starts from: its directory, its tokenizer, the tokens that end a reply."""

from __future__ import annotations

from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.models import resolve_base_model


def load_tokenizer(base_dir: Path):
    """The base's tokenizer, with a pad token (batches need one; the EOS serves where the base has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_and_tokenizer(cfg, log) -> tuple[Path, object]:
    """The resolved base directory and its tokenizer, which must carry a chat template."""
    base_dir = resolve_base_model(cfg.base_model, log=log)
    tokenizer = load_tokenizer(base_dir)
    if not tokenizer.chat_template:
        raise GuardtuneError(f"base model {cfg.base_model}: tokenizer has no chat template")
    return base_dir, tokenizer


def stop_tokens(tokenizer, base_dir: Path) -> list[str]:
    """The base's generation-config EOS ids and the tokenizer's EOS, as token strings."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(base_dir).eos_token_id
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    names = [tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(ids)]
    return [n for n in names if n]
