"""Replay (self-distillation): the base model answers a user-written prompt list, and those
(prompt, base reply) pairs are mixed into fine-tuning so the adapter keeps the base's general
behaviour.

Generated sets are cached under `<cache>/replay/<key>.jsonl`, keyed by the prompt bytes, the base
weights, the chat template, the system prompt and the decoding settings: the same inputs never
decode twice, and a change to any of them decodes afresh.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.fsutil import atomic_write_text
from kernel.models import resolve_base_model, weights_sha256
from kernel.paths import cache_root
from training.base_model import stop_tokens
from training.data.readers import utf8_lines
from training.decode import greedy_replies

REPLAY_FORMAT = 1


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    lines = utf8_lines(path, "replay prompts")
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise GuardtuneError(f"replay prompts {path}: no prompts (one per line)")
    return prompts


def replay_key(prompts_path: Path, base_sha256: str, tokenizer, system_prompt, max_new_tokens: int) -> str:
    src = json.dumps([REPLAY_FORMAT, hashlib.sha256(Path(prompts_path).read_bytes()).hexdigest(), base_sha256,
                      str(tokenizer.chat_template), system_prompt, max_new_tokens])
    return hashlib.sha256(src.encode()).hexdigest()[:20]


def replay_files(cfg, tokenizer, *, log=print) -> dict[int, Path]:
    """The generated file of every replay source in `datasets:`, by its index there."""
    return {i: build_replay(src.replay, cfg, tokenizer, log=log)[0]
            for i, src in enumerate(cfg.datasets or []) if src.replay is not None}


def build_replay(spec, cfg, tokenizer, *, log=print) -> tuple[Path, bool]:
    """The replay JSONL (messages rows) for one `replay:` source: (path, cache_hit)."""
    prompts = read_prompts(spec.prompts)
    base_dir = resolve_base_model(cfg.base_model, log=log)
    key = replay_key(spec.prompts, weights_sha256(base_dir), tokenizer, cfg.system_prompt, spec.max_new_tokens)
    path = cache_root() / "replay" / f"{key}.jsonl"
    if path.is_file():
        log(f"replay: cache hit {path} ({len(prompts)} prompts)")
        return path, True
    log(f"replay: the base model answers {len(prompts)} prompts from {spec.prompts} "
        f"(greedy, at most {spec.max_new_tokens} tokens)")
    replies = _base_replies(base_dir, tokenizer, prompts, spec, cfg.system_prompt, log)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in zip(prompts, replies) if r.strip()]
    if len(rows) < len(prompts):
        log(f"replay: {len(prompts) - len(rows)} empty replies left out")
    if not rows:
        raise GuardtuneError(f"replay prompts {spec.prompts}: the base model gave no non-empty reply")
    # Whole or not at all: a killed run leaves no half cache that a later run would trust.
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    log(f"replay: wrote {len(rows)} pairs to {path}")
    return path, False


def _base_replies(base_dir: Path, tokenizer, prompts: list[str], spec, system_prompt, log) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    stop_ids = tokenizer.convert_tokens_to_ids(stop_tokens(tokenizer, base_dir))
    return greedy_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                          system_prompt=system_prompt, stop_ids=stop_ids, max_new_tokens=spec.max_new_tokens,
                          batch_size=spec.batch_size, log=log, label="replay")
