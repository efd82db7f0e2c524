"""`guardtune eval`: how an adapter does on held-out rows, and what it forgot.

- `guardtune eval ADAPTER DATA`: loss and perplexity (adapter and base) on the rows' assistant
  turns; BLEU and ROUGE-1/2/L of greedy replies against each row's last assistant turn; samples.
- `guardtune eval --forgetting ADAPTER [GENERAL.jsonl]`: on a general-instruction set, base against
  adapter: perplexity of both, and how far the adapter's greedy answers moved from the base's.

BLEU is sacrebleu's (0-100); ROUGE is rouge-score's F1 (0-1). Chinese/Japanese/Korean text has no
spaces, so BLEU uses sacrebleu's `zh` tokenizer and ROUGE counts CJK characters one by one.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch

from kernel.errors import GuardtuneError
from training.adapters import load_adapter
from training.data.processor import IGNORE, MaskOptions, tokenize_conversation
from training.data.readers import read_jsonl
from training.decode import greedy_replies
from training.generate import compare

DEFAULT_GENERAL_EVAL = Path(__file__).resolve().parents[1] / "examples" / "data" / "general_eval.jsonl"

# Han, kana and hangul: scripts written without spaces between words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_RE = re.compile(f"[{_CJK}]")
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class RougeTokenizer:
    """rouge-score's tokenizer interface: CJK characters one by one, other scripts as lowercase words.

    On ASCII text this gives the same tokens as rouge-score's default tokenizer; its default drops
    every non-[a-z0-9] character, which would turn Chinese into nothing.
    """

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(text.lower())


def has_cjk(texts) -> bool:
    return any(_CJK_RE.search(t or "") for t in texts)


def text_scores(hyps: list[str], refs: list[str]) -> dict:
    """Corpus BLEU (0-100) and mean ROUGE-1/2/L F1 (0-1) of hyps against refs, one reference each."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    if len(hyps) != len(refs) or not hyps:
        raise GuardtuneError("text_scores: need as many hypotheses as references, at least one")
    tokenize = "zh" if has_cjk(refs) or has_cjk(hyps) else "13a"
    # effective_order: a reply shorter than 4 tokens is scored on the n-gram orders it has, not zeroed.
    bleu = BLEU(tokenize=tokenize, effective_order=True).corpus_score(hyps, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=RougeTokenizer())
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, r in zip(hyps, refs):
        for name, score in scorer.score(r, h).items():
            totals[name] += score.fmeasure
    return {"bleu": round(bleu, 4), **{k: round(v / len(hyps), 4) for k, v in totals.items()},
            "bleu_tokenize": tokenize}


@torch.no_grad()
def mean_loss(model, examples) -> tuple[float, int]:
    """Token-weighted mean loss over trained (unmasked) tokens."""
    total, count = 0.0, 0
    model.eval()
    for ex in examples:
        ids = torch.tensor([ex.input_ids], device=model.device)
        labels = torch.tensor([ex.labels], device=model.device)
        n = int((labels[:, 1:] != IGNORE).sum())
        if n == 0:
            continue
        loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * n
        count += n
    if count == 0:
        raise GuardtuneError("eval data has no assistant tokens to score")
    return total / count, count


def _replies(model, tokenizer, prompts, *, base: bool, **kw) -> list[str]:
    if not base:
        return greedy_replies(model, tokenizer, prompts, label="generate adapter", **kw)
    with model.disable_adapter():
        return greedy_replies(model, tokenizer, prompts, label="generate base", **kw)


def evaluate(adapter_dir, data_path, *, max_rows=200, samples=3, gen_rows=50, max_new_tokens=64, batch_size=8,
             log=print) -> dict:
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
    stop_ids = tokenizer.convert_tokens_to_ids(manifest.stop_tokens)
    if gen_rows:
        # The reference is the last assistant turn; the prompt is everything before it.
        scored = convs[:gen_rows]
        prompts, refs = [c[:-1] for c in scored], [c[-1]["content"] for c in scored]
        kw = dict(system_prompt=manifest.system_prompt, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, log=log)
        tuned = _replies(model, tokenizer, prompts, base=False, **kw)
        base = _replies(model, tokenizer, prompts, base=True, **kw)
        report["generation"] = {"rows": len(scored), "max_new_tokens": max_new_tokens,
                                "adapter": text_scores(tuned, refs), "base": text_scores(base, refs),
                                "replies": [{"reference": r, "adapter": a, "base": b}
                                            for r, a, b in zip(refs, tuned, base)]}
    if samples:
        report["samples"] = [
            {"user": u, "base": b, "adapter": a}
            for u, b, a in compare(model, tokenizer, convs[:samples], system_prompt=manifest.system_prompt, stop_ids=stop_ids)
        ]
    return report


def forgetting(model, tokenizer, convs, *, system_prompt=None, stop_ids=None, max_length=1024, max_new_tokens=64,
               batch_size=8, log=print) -> dict:
    """Base against adapter on general chats: perplexity, and the adapter's drift from the base's answers.

    `model` is a PeftModel; the base is the same model with its adapter disabled, so nothing loads twice.
    """
    opts = MaskOptions(max_length=max_length, system_prompt=system_prompt)
    examples = [ex for ex in (tokenize_conversation(tokenizer, c, opts) for c in convs) if ex is not None]
    loss, tokens = mean_loss(model, examples)
    with model.disable_adapter():
        base_loss, _ = mean_loss(model, examples)
    prompts, refs = [c[:-1] for c in convs], [c[-1]["content"] for c in convs]
    kw = dict(system_prompt=system_prompt, stop_ids=stop_ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
              log=log)
    tuned = _replies(model, tokenizer, prompts, base=False, **kw)
    base = _replies(model, tokenizer, prompts, base=True, **kw)
    agree = text_scores(tuned, base)
    ppl, base_ppl = math.exp(loss), math.exp(base_loss)
    return {
        "rows": len(convs), "tokens": tokens, "max_new_tokens": max_new_tokens,
        "base_perplexity": round(base_ppl, 4), "adapter_perplexity": round(ppl, 4),
        "ppl_ratio": round(ppl / base_ppl, 4),
        "agreement_rougeL": agree["rougeL"], "agreement_bleu": agree["bleu"],
        "exact_match": round(sum(a.strip() == b.strip() for a, b in zip(tuned, base)) / len(convs), 4),
        "base_vs_reference": text_scores(base, refs), "adapter_vs_reference": text_scores(tuned, refs),
        "samples": [{"user": p[-1]["content"], "base": b, "adapter": a}
                    for p, b, a in list(zip(prompts, base, tuned))[:3]],
    }


def forgetting_after_training(cfg, model, tokenizer, stop_ids, *, log=print) -> dict:
    """`eval_forgetting: true`: the check on the freshly trained model, for the manifest's metrics."""
    path = cfg.forgetting_file or DEFAULT_GENERAL_EVAL
    convs = read_jsonl(path).conversations[: cfg.forgetting_rows]
    log(f"forgetting: base vs adapter on {len(convs)} rows of {path}")
    report = forgetting(model, tokenizer, convs, system_prompt=cfg.system_prompt, stop_ids=stop_ids,
                        max_length=cfg.max_length, log=log)
    report["file"] = str(path)
    log(f"forgetting: perplexity {report['base_perplexity']:.2f} -> {report['adapter_perplexity']:.2f} "
        f"(x{report['ppl_ratio']:.2f}); answers agree with the base: ROUGE-L {report['agreement_rougeL']:.3f}, "
        f"exact {report['exact_match']:.0%}")
    report.pop("samples")
    return report


def evaluate_forgetting(adapter_dir, data_path=None, *, max_rows=30, max_new_tokens=64, batch_size=8,
                        log=print) -> dict:
    manifest, tokenizer, model = load_adapter(adapter_dir)
    path = Path(data_path) if data_path else DEFAULT_GENERAL_EVAL
    convs = read_jsonl(path).conversations[:max_rows]
    log(f"forgetting: base vs {adapter_dir} on {len(convs)} rows of {path}")
    report = forgetting(model, tokenizer, convs, system_prompt=manifest.system_prompt,
                        stop_ids=tokenizer.convert_tokens_to_ids(manifest.stop_tokens),
                        max_length=int(manifest.train_config.get("max_length", 1024)),
                        max_new_tokens=max_new_tokens, batch_size=batch_size, log=log)
    return {"adapter": str(adapter_dir), "file": str(path), **report}


def forgetting_table(r: dict) -> str:
    b, a = r["base_vs_reference"], r["adapter_vs_reference"]
    rows = [
        ("metric", "base", "adapter", "change"),
        ("perplexity", f"{r['base_perplexity']:.3f}", f"{r['adapter_perplexity']:.3f}", f"x{r['ppl_ratio']:.3f}"),
        ("ROUGE-L vs reference", f"{b['rougeL']:.3f}", f"{a['rougeL']:.3f}", f"{a['rougeL'] - b['rougeL']:+.3f}"),
        ("BLEU vs reference", f"{b['bleu']:.2f}", f"{a['bleu']:.2f}", f"{a['bleu'] - b['bleu']:+.2f}"),
        ("agreement with base, ROUGE-L", "1.000", f"{r['agreement_rougeL']:.3f}", f"{r['agreement_rougeL'] - 1:+.3f}"),
        ("agreement with base, exact", "1.000", f"{r['exact_match']:.3f}", f"{r['exact_match'] - 1:+.3f}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"forgetting: {r['adapter']} on {r['file']} ({r['rows']} rows, {r['tokens']} reference tokens, "
             f"greedy answers up to {r['max_new_tokens']} tokens)"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    lines.append(f"regression: perplexity x{r['ppl_ratio']:.3f}, answers agree with the base at ROUGE-L "
                 f"{r['agreement_rougeL']:.3f} ({r['exact_match']:.0%} identical)")
    return "\n".join(lines)


def evaluate_cli(args) -> int:
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    forget = getattr(args, "forgetting", None)
    if forget:
        if args.adapter and args.data:
            raise GuardtuneError("eval --forgetting ADAPTER takes at most one positional argument: the general set")
        report = evaluate_forgetting(forget, args.adapter, max_rows=min(args.max_rows, 10_000),
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, log=log)
        if args.json:
            print(json.dumps(report, indent=2, ensure_ascii=False))
        else:
            print(forgetting_table(report))
        return 0
    if not args.adapter or not args.data:
        raise GuardtuneError("eval needs ADAPTER DATA (or --forgetting ADAPTER [GENERAL.jsonl])")
    report = evaluate(args.adapter, args.data, max_rows=args.max_rows, samples=args.samples, gen_rows=args.gen_rows,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, log=log)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"rows {report['rows']}  tokens {report['tokens']}")
    print(f"adapter  loss {report['loss']:.4f}  perplexity {report['perplexity']:.2f}")
    print(f"base     loss {report['base_loss']:.4f}  perplexity {report['base_perplexity']:.2f}")
    if "generation" in report:
        g = report["generation"]
        print(f"greedy replies vs the reference reply, {g['rows']} rows (BLEU tokenize {g['adapter']['bleu_tokenize']}):")
        for name in ("adapter", "base"):
            m = g[name]
            print(f"{name:8} BLEU {m['bleu']:.2f}  ROUGE-1 {m['rouge1']:.3f}  ROUGE-2 {m['rouge2']:.3f}  "
                  f"ROUGE-L {m['rougeL']:.3f}")
    for i, s in enumerate(report.get("samples", []), start=1):
        print(f"--- sample {i}\n  user:    {s['user']}\n  base:    {s['base']}\n  adapter: {s['adapter']}")
    return 0
