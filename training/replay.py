"""Replay (self-distillation): the base model answers a user-written prompt list, and those
(prompt, base reply) pairs are mixed into fine-tuning so the adapter keeps the base's general
behaviour. Also home of the batched greedy decoder that eval uses.

Generated sets are cached under `<cache>/replay/<key>.jsonl`, keyed by the prompt bytes, the base
weights, the chat template, the system prompt and the decoding settings: the same inputs never
decode twice, and a change to any of them decodes afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.paths import cache_root
from training.data.processor import render, with_system

REPLAY_FORMAT = 1


def greedy_replies(model, tokenizer, prompts, *, system_prompt=None, stop_ids=None, max_new_tokens=96,
                   batch_size=8, log=None, label="generate") -> list[str]:
    """Greedy replies to each message list, decoded in left-padded batches (with a progress line)."""
    import torch

    texts = [render(tokenizer, with_system(list(m), system_prompt), add_generation_prompt=True) for m in prompts]
    # Batches of similar length waste less compute on padding; answers go back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    t0, done = time.time(), 0
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                     pad_token_id=pad, use_cache=True)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            done += len(idx)
            if log:
                log(f"{label}: {done}/{len(texts)} replies, {time.time() - t0:.0f}s")
    finally:
        tokenizer.padding_side = side
    return out


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    from training.data.readers import utf8_lines

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


def build_replay(spec, cfg, tokenizer, *, log=print) -> tuple[Path, bool]:
    """The replay JSONL (messages rows) for one `replay:` source: (path, cache_hit)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kernel.models import resolve_base_model, weights_sha256

    prompts = read_prompts(spec.prompts)
    base_dir = resolve_base_model(cfg.base_model, log=log)
    key = replay_key(spec.prompts, weights_sha256(base_dir), tokenizer, cfg.system_prompt, spec.max_new_tokens)
    path = cache_root() / "replay" / f"{key}.jsonl"
    if path.is_file():
        log(f"replay: cache hit {path} ({len(prompts)} prompts)")
        return path, True
    log(f"replay: the base model answers {len(prompts)} prompts from {spec.prompts} "
        f"(greedy, at most {spec.max_new_tokens} tokens)")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    from training.trainer import stop_tokens

    stop_ids = tokenizer.convert_tokens_to_ids(stop_tokens(tokenizer, base_dir))
    replies = greedy_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                             system_prompt=cfg.system_prompt, stop_ids=stop_ids,
                             max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, log=log, label="replay")
    del model
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in zip(prompts, replies) if r.strip()]
    if len(rows) < len(prompts):
        log(f"replay: {len(prompts) - len(rows)} empty replies left out")
    if not rows:
        raise GuardtuneError(f"replay prompts {spec.prompts}: the base model gave no non-empty reply")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)  # a killed run leaves no half cache that a later run would trust
    log(f"replay: wrote {len(rows)} pairs to {path}")
    return path, False
