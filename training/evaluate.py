"""`guardtune eval ADAPTER DATA`: loss and perplexity on held-out rows, plus sample replies."""

from __future__ import annotations

import json
import math
import sys

import torch

from guardtune.errors import GuardtuneError
from training.adapters import load_adapter
from training.data.processor import IGNORE, MaskOptions, tokenize_conversation
from training.data.readers import read_jsonl


@torch.no_grad()
def mean_loss(model, examples) -> tuple[float, int]:
    """Token-weighted mean loss over trained (unmasked) tokens."""
    total, count = 0.0, 0
    model.eval()
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor([ex.labels])
        n = int((labels[:, 1:] != IGNORE).sum())
        if n == 0:
            continue
        loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * n
        count += n
    if count == 0:
        raise GuardtuneError("eval data has no assistant tokens to score")
    return total / count, count


def evaluate(adapter_dir, data_path, *, max_rows=200, samples=3, log=print) -> dict:
    manifest, tokenizer, model = load_adapter(adapter_dir)
    convs = read_jsonl(data_path).conversations[:max_rows]
    opts = MaskOptions(max_length=int(manifest.train_config.get("max_length", 1024)),
                       system_prompt=manifest.system_prompt)
    examples = [ex for ex in (tokenize_conversation(tokenizer, c, opts) for c in convs) if ex is not None]
    log(f"eval: scoring {len(examples)} conversations with {adapter_dir}")
    loss, tokens = mean_loss(model, examples)
    with model.disable_adapter():
        base_loss, _ = mean_loss(model, examples)
    report = {
        "adapter": str(adapter_dir), "rows": len(examples), "tokens": tokens,
        "loss": loss, "perplexity": math.exp(loss),
        "base_loss": base_loss, "base_perplexity": math.exp(base_loss),
    }
    if samples:
        from training.generate import compare

        stop_ids = tokenizer.convert_tokens_to_ids(manifest.stop_tokens)
        report["samples"] = [
            {"user": u, "base": b, "adapter": a}
            for u, b, a in compare(model, tokenizer, convs[:samples], system_prompt=manifest.system_prompt, stop_ids=stop_ids)
        ]
    return report


def evaluate_cli(args) -> int:
    report = evaluate(args.adapter, args.data, max_rows=args.max_rows, samples=args.samples,
                      log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"rows {report['rows']}  tokens {report['tokens']}")
    print(f"adapter  loss {report['loss']:.4f}  perplexity {report['perplexity']:.2f}")
    print(f"base     loss {report['base_loss']:.4f}  perplexity {report['base_perplexity']:.2f}")
    for i, s in enumerate(report.get("samples", []), start=1):
        print(f"--- sample {i}\n  user:    {s['user']}\n  base:    {s['base']}\n  adapter: {s['adapter']}")
    return 0
