"""Greedy replies from a tuned model (any method), used to show what training changed."""

from __future__ import annotations

import torch

from training.data.processor import render, with_system


@torch.no_grad()
def reply(model, tokenizer, messages, *, system_prompt=None, stop_ids=None, max_new_tokens=48) -> str:
    prompt = render(tokenizer, with_system(messages, system_prompt), add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    model.eval()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def compare(model, tokenizer, conversations, *, system_prompt=None, stop_ids=None, max_new_tokens=48):
    """(prompt, base reply, tuned reply) for each conversation's last user turn.

    `model` is a PeftModel or a full model from training.adapters (both have `disable_adapter()`).
    """
    rows = []
    for conv in conversations:
        prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
        kw = dict(system_prompt=system_prompt, stop_ids=stop_ids, max_new_tokens=max_new_tokens)
        tuned = reply(model, tokenizer, prompt, **kw)
        with model.disable_adapter():
            base = reply(model, tokenizer, prompt, **kw)
        rows.append((prompt[-1]["content"], base, tuned))
    return rows


def print_comparison(rows, log=print) -> None:
    for i, (prompt, base, tuned) in enumerate(rows, start=1):
        log(f"--- sample {i}\n  user:    {prompt}\n  base:    {base}\n  adapter: {tuned}")
