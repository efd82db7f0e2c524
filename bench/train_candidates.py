"""One LoRA training step on CPU under each speed candidate, against the plain step, in one run.

Every candidate runs in its own process (so peak RSS is its own) on the same fixed batches: the first
200 sales chats tokenised with `train`'s masks, 4 rows a step, SmolLM2-135M fp32, LoRA r16 all-linear,
gradient checkpointing. The baseline step is what a plain HF Trainer does: padded rows, the model's
full-vocabulary loss, fused AdamW, every layer checkpointed. Reports median s/step (after 2 warm-up
steps), conversations/s and peak RSS, each as a ratio to the baseline, alternating over `--rounds`.
Results: bench/results/train_candidates.{json,md}; docs/training-speed.md cites them.

    .venv/bin/python bench/train_candidates.py [--steps 8] [--rounds 2] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402

# name -> (description, settings the child reads)
CANDIDATES = {
    "baseline": ("padded rows, full-vocabulary loss, fused AdamW, all layers checkpointed", {}),
    "head_on_trained": ("the output head on trained positions only (training/head_loss.py)", {"head": "trained"}),
    "packing": ("rows packed to 256 tokens (padding gone, 1.77 chats a row)", {"packing": True}),
    "packing_head": ("packing + head on trained positions", {"packing": True, "head": "trained"}),
    "group_by_length": ("padded rows grouped by length (LengthGroupedSampler order)", {"grouped": True}),
    "no_pad_multiple": ("padded to the longest row, not a multiple of 8", {"multiple": 1}),
    "foreach_adamw": ("AdamW foreach (multi-tensor) instead of fused", {"optim": "foreach"}),
    "one_thread": ("torch.set_num_threads(1) instead of 2", {"threads": 1}),
    "reentrant_checkpointing": ("reentrant activation checkpointing (LLaMA-Factory's) instead of non-reentrant",
                               {"reentrant": True}),
    "half_checkpointed": ("every other layer checkpointed (selective)", {"checkpoint_every": 2}),
    "no_checkpointing": ("no activation checkpointing", {"checkpoint_every": 0}),
    "compiled": ("torch.compile of the model (inductor, CPU); compile time excluded", {"compile": True}),
}

CHILD = r"""
import json, random, resource, statistics, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq
from transformers.trainer_pt_utils import LengthGroupedSampler
from kernel.models import resolve_base_model
from training.data.packing import PackedCollator, pack
from training.data.processor import IGNORE, MaskOptions, tokenize_batch
from training.data.readers import read_jsonl
from training.head_loss import decoder_and_head, trained_token_loss

opt, steps = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(opt.get("threads", torch.get_num_threads()))
base = resolve_base_model("smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(base)
examples = [e for e in tokenize_batch(tok, read_jsonl(sys.argv[3]).conversations[:200], MaskOptions(max_length=256)) if e]
random.Random(0).shuffle(examples)
if opt.get("packing"):
    rows = pack(examples, 256)
    features = [dict(zip(rows, v)) for v in zip(*rows.values())]
    collate = PackedCollator(tok.pad_token_id)
else:
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    if opt.get("grouped"):
        order = list(LengthGroupedSampler(4, lengths=[len(f["input_ids"]) for f in features],
                                          generator=torch.Generator().manual_seed(0)))
        features = [features[i] for i in order]
    collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE,
                                     pad_to_multiple_of=opt.get("multiple", 8))
chats_per_row = len(examples) / len(features)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model.config.use_cache = False
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
every = opt.get("checkpoint_every", 1)
if every:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": opt.get("reentrant", False)})
    if opt.get("reentrant"):
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    layers = model.get_base_model().model.layers
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
model.train()
params = [p for p in model.parameters() if p.requires_grad]
optim = torch.optim.AdamW(params, lr=2e-4, fused=opt.get("optim", "fused") == "fused",
                          foreach=opt.get("optim") == "foreach" or None)
forward = torch.compile(model) if opt.get("compile") else model
parts = decoder_and_head(model)

def step(batch):
    if opt.get("head") == "trained":
        loss = trained_token_loss(*parts, batch, None)
    else:
        loss = forward(**batch).loss
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return float(loss)

times, losses = [], []
for k in range(steps + 2):
    batch = collate(features[(4 * k) % len(features):(4 * k) % len(features) + 4])
    t0 = time.perf_counter()
    losses.append(step(batch))
    if k >= 2:
        times.append(time.perf_counter() - t0)
print("RESULT", json.dumps({"s_per_step": statistics.median(times), "chats_per_row": chats_per_row,
      "loss": losses, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
"""


def measure(name: str, steps: int) -> dict:
    settings = CANDIDATES[name][1]
    data = ROOT / "examples" / "data" / "sales_chat.jsonl"
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), str(steps), str(data)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        return {"name": name, "error": proc.stderr.strip().splitlines()[-1][:200]}
    r = json.loads(proc.stdout.split("RESULT", 1)[1])
    return {"name": name, "s_per_step": round(r["s_per_step"], 3),
            "conversations_per_s": round(4 * r["chats_per_row"] / r["s_per_step"], 3),
            "peak_rss_mb": round(r["peak_rss_kb"] / 1024), "first_loss": round(r["loss"][0], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=list(CANDIDATES))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_candidates")
    a = p.parse_args()
    names = ["baseline"] + [n for n in (a.only or CANDIDATES) if n != "baseline"]
    runs = []
    for k in range(a.rounds):
        for n in names:
            runs.append(measure(n, a.steps) | {"round": k + 1})
            print(f"bench: {runs[-1]}", file=sys.stderr, flush=True)
    med = {}
    for n in names:
        ok = [r for r in runs if r["name"] == n and "error" not in r]
        med[n] = {k: statistics.median(r[k] for r in ok) for k in ("s_per_step", "conversations_per_s", "peak_rss_mb")} \
            if ok else {"error": next(r["error"] for r in runs if r["name"] == n)}
    b = med["baseline"]
    rows = []
    for n in names:
        m = med[n]
        if "error" in m:
            rows.append([n, CANDIDATES[n][0], "failed: " + m["error"], "", "", "", "", ""])
            continue
        rows.append([n, CANDIDATES[n][0], m["s_per_step"], round(m["s_per_step"] / b["s_per_step"], 2),
                     m["conversations_per_s"], round(m["conversations_per_s"] / b["conversations_per_s"], 2),
                     m["peak_rss_mb"], round(m["peak_rss_mb"] / b["peak_rss_mb"], 2)])
    info = results_io.meta(config="SmolLM2-135M fp32, LoRA r16 all-linear, batch 4, cutoff 256, first 200 sales "
                                  f"chats, {a.steps} timed steps after 2 warm-up", rounds=a.rounds)
    lines = [f"Measured {info['date']} on {info['machine']}; {info['config']}; medians of {a.rounds} alternating "
             "rounds, each candidate in its own process.", ""]
    lines += results_io.table(["candidate", "what", "s/step", "x baseline", "conversations/s", "x baseline",
                               "peak RSS MB", "x baseline"], rows)
    results_io.write(a.out, {"meta": info, "median": med, "runs": runs}, lines)


if __name__ == "__main__":
    main()
