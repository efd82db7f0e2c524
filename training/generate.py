"""Base against tuned replies from a tuned model (any method), to show what training changed."""

from __future__ import annotations

from training.decode import reply


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
