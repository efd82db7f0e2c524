"""Greedy decoding, the one decoder behind training's samples, replay and eval."""

from __future__ import annotations

import time

from training.data.processor import render, with_system


def greedy_replies(model, tokenizer, prompts, *, system_prompt=None, stop_ids=None, max_new_tokens=96,
                   batch_size=8, log=None, label="generate") -> list[str]:
    """Greedy replies to each message list, decoded in left-padded batches (with a progress line)."""
    import torch

    texts = [render(tokenizer, with_system(list(m), system_prompt), add_generation_prompt=True) for m in prompts]
    # Batches of similar length waste less compute on padding; answers go back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_token = tokenizer.pad_token
    if pad_token is None:  # a base without one (Llama-2 style) pads with EOS here; the mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
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
        if pad_token is None:
            tokenizer.pad_token = None
    return out


def reply(model, tokenizer, messages, *, system_prompt=None, stop_ids=None, max_new_tokens=48) -> str:
    """The greedy reply to one message list (a batch of one: no padding)."""
    return greedy_replies(model, tokenizer, [messages], system_prompt=system_prompt, stop_ids=stop_ids,
                          max_new_tokens=max_new_tokens, batch_size=1)[0]
