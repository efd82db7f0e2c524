"""Training speed and memory per PEFT method on the example config, LoRA as the baseline.

Each method runs `train examples/train_lora.yaml` in its own process (so peak RSS is its own) for
the same number of steps on the same data. Reports median s/step (first step excluded: warm-up),
trained tokens/s and peak RSS, each as a ratio to LoRA. Results: bench/results/train_methods.{json,md}.

`--packing` instead compares SFT with `packing: true` against padded batches (the baseline) on
generated mixed-length chats: one epoch each over the same conversations, so both see the same
non-pad tokens; reports non-pad tokens/s and peak RSS and their ratios.
Results: bench/results/train_packing.{json,md}.

    .venv/bin/python bench/train_bench.py [--steps 20] [--methods lora qlora dora]
    .venv/bin/python bench/train_bench.py --packing [--rows 40]
    .venv/bin/python bench/train_bench.py --vs-baseline [--rounds 2] [--variant NAME KEY=VALUE ...]

`--vs-baseline` runs `train` with its defaults against bench/hf_baseline.py (a plain Hugging Face
Trainer + PEFT script, what LLaMA-Factory does inside), alternating, on the first 200 sales chats:
LoRA r16 all-linear, alpha 32, dropout 0, batch 4, cutoff 256, lr 2e-4, cosine, 20 steps, gradient
checkpointing, fp32. Reports conversations/s, non-pad tokens/s and peak RSS as ratios to the
baseline, the loss per step, and each adapter's loss on 100 held-out chats.
Results: bench/results/train_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402

CHILD = """
import resource, sys
from training.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


def run_method(method: str, steps: int, work: Path) -> dict:
    run_dir, out = work / f"runs-{method}", work / f"adapter-{method}"
    args = ["examples/train_lora.yaml", f"method={method}", f"max_steps={steps}", f"run_dir={run_dir}",
            f"output_dir={out}", "report_to=none", "generation_samples=0", "resume=never", f"eval_steps={steps}",
            f"save_steps={steps}", f"task=bench-{method}"]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    peak_kb = int(proc.stdout.split("PEAK_RSS_KB")[-1].split()[0])
    s_step = statistics.median(r["s_per_step"] for r in train_rows[1:])
    return {
        "method": method,
        "steps": len(train_rows),
        "s_per_step": round(s_step, 2),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train_rows[1:]), 1),
        "peak_rss_gb": round(peak_kb / 1024 / 1024, 2),
        "first_loss": round(train_rows[0]["loss"], 3),
        "last_loss": round(train_rows[-1]["loss"], 3),
        "wall_s": round(time.time() - t0, 1),
    }


def mixed_length_chats(n: int) -> list[dict]:
    """Our own chats: three in four short, one in four long, as support logs tend to be."""
    short = ["Yes, we install on Saturdays.", "The Vault 10 is 6,900 dollars installed.", "Our survey is free."]
    long_reply = ("Here is how an installation goes. A surveyor visits, measures the roof and checks the fuse box. "
                  "We send a quote with the panel layout, the battery size and the expected yearly output. ")
    rows = []
    for i in range(n):
        reply = long_reply * (6 + i % 4) if i % 4 == 0 else short[i % 3]
        rows.append({"messages": [{"role": "user", "content": f"Question {i}: can you tell me more?"},
                                  {"role": "assistant", "content": reply}]})
    return rows


def run_packing(packing: bool, data: Path, work: Path) -> dict:
    name = "packing" if packing else "padding"
    run_dir = work / f"runs-{name}"
    args = ["task=bench-" + name, f"train_file={data}", f"packing={str(packing).lower()}", "max_length=512",
            "batch_size=4", "eval_split=0", "num_epochs=1", "gradient_checkpointing=false", f"run_dir={run_dir}",
            f"output_dir={work / ('adapter-' + name)}", "report_to=none", "generation_samples=0", "resume=never",
            "save_steps=100000", "lr_scheduler=constant", "warmup_ratio=0"]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "GUARDTUNE_CACHE": str(work / "cache")})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # "data: N train / 0 eval conversations, T/TOTAL tokens trained, ..." : TOTAL is every non-pad token
    line = next(x for x in proc.stderr.splitlines() if "tokens trained" in x)
    total = int(line.split("tokens trained")[0].split("/")[-1])
    train_s = sum(r["s_per_step"] for r in steps)
    return {"mode": name, "steps": len(steps), "non_pad_tokens": total, "train_s": round(train_s, 1),
            "s_per_step": round(statistics.median(r["s_per_step"] for r in steps), 2),
            "non_pad_tokens_per_s": round(total / train_s, 1),
            "peak_rss_gb": round(int(proc.stdout.split("PEAK_RSS_KB")[-1].split()[0]) / 1024 / 1024, 2),
            "wall_s": round(time.time() - t0, 1)}


def packing_bench(n_rows: int, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "cache").mkdir()
        from kernel.paths import cache_root

        (work / "cache" / "models").symlink_to(cache_root() / "models")  # the materialised base, not rebuilt
        data = work / "mixed.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in mixed_length_chats(n_rows)))
        results = []
        for packing in (False, True):
            print(f"bench: {'packing' if packing else 'padding'}, one epoch of {n_rows} chats ...", file=sys.stderr,
                  flush=True)
            results.append(run_packing(packing, data, work))
            print(f"bench: {results[-1]}", file=sys.stderr, flush=True)
    base = results[0]
    for r in results:
        r["tokens_per_s_vs_padding"] = round(r["non_pad_tokens_per_s"] / base["non_pad_tokens_per_s"], 2)
        r["peak_rss_vs_padding"] = round(r["peak_rss_gb"] / base["peak_rss_gb"], 2)
    info = results_io.meta(config=f"SmolLM2-135M LoRA r16 all-linear, fp32, batch 4, max_length 512, no gradient "
                                  f"checkpointing; {n_rows} generated chats, 3 in 4 short (~50 tokens), 1 in 4 "
                                  f"long (~300-450 tokens); one epoch each", rows=n_rows)
    lines = [f"Measured {info['date']} on {info['machine']}; {info['config']}.", ""]
    lines += results_io.table(
        ["mode", "steps", "non-pad tokens", "train s", "non-pad tokens/s", "x padding", "peak RSS GB", "x padding"],
        [[r["mode"], r["steps"], r["non_pad_tokens"], r["train_s"], r["non_pad_tokens_per_s"],
          r["tokens_per_s_vs_padding"], r["peak_rss_gb"], r["peak_rss_vs_padding"]] for r in results])
    results_io.write(out, {"meta": info, "results": results}, lines)


SALES = ROOT / "examples" / "data" / "sales_chat.jsonl"
SPEED_SETTINGS = ["max_length=256", "method=lora", "rank=16", "alpha=32", "dropout=0", "target_modules=all-linear",
                  "batch_size=4", "grad_accum=1", "learning_rate=0.0002", "lr_scheduler=cosine", "warmup_ratio=0",
                  "gradient_checkpointing=true", "eval_split=0", "report_to=none", "generation_samples=0",
                  "resume=never", "save_steps=100000", "eval_steps=100000", "logging_steps=1", "seed=42"]

EVAL_CHILD = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from kernel.models import resolve_base_model
from training.data.processor import MaskOptions, tokenize_batch
from training.data.readers import read_jsonl
base = resolve_base_model("smollm2-135m-instruct")
tok = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), sys.argv[1]).eval()
convs = read_jsonl(sys.argv[2]).conversations[int(sys.argv[3]):]
total = count = 0.0
with torch.no_grad():
    for ex in tokenize_batch(tok, convs, MaskOptions(max_length=256)):
        if ex is None:
            continue
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
print("RESULT", json.dumps({"eval_loss": total / count, "eval_tokens": int(count)}), flush=True)
"""


def _child(cmd: list[str], work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GUARDTUNE_CACHE": str(work / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {cmd[1:3]} failed:\n{proc.stderr[-3000:]}")
    return proc


def run_guardtune(name: str, overrides: list[str], data: Path, steps: int, work: Path) -> dict:
    run_dir, out = work / f"runs-{name}", work / f"adapter-{name}"
    args = [f"task=bench-{name}", "base_model=smollm2-135m-instruct", f"train_file={data}", f"max_steps={steps}",
            f"run_dir={run_dir}", f"output_dir={out}", *SPEED_SETTINGS, *overrides]
    proc = _child([sys.executable, "-c", CHILD, *args], work)
    steps_log = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_log = [{"step": r["step"], "loss": r["loss"], "s_per_step": r["s_per_step"]} for r in steps_log if "loss" in r]
    line = next(x for x in proc.stderr.splitlines() if "tokens trained" in x)  # "data: N train / ... T/TOTAL tokens"
    rows = int(line.split("data:")[1].split("train")[0])
    sequences = int(line.split("packed into")[1].split()[0]) if "packed into" in line else rows
    mode = next((x.split("host memory:")[1].strip() for x in proc.stderr.splitlines() if "host memory:" in x), "")
    return {"steps": steps_log, "rows": rows, "sequences": sequences, "adapter": str(out), "memory_mode": mode,
            "tokens": int(line.split("tokens trained")[0].split("/")[-1]),
            "peak_rss_kb": int(proc.stdout.split("PEAK_RSS_KB")[-1].split()[0])}


def run_baseline(data: Path, steps: int, work: Path) -> dict:
    out = work / "baseline"
    proc = _child([sys.executable, str(ROOT / "bench" / "hf_baseline.py"), str(data), str(out), "--rows", "200",
                   "--steps", str(steps)], work)
    return json.loads(proc.stdout.split("RESULT", 1)[1]) | {"adapter": str(out / "adapter")}


def speed_summary(name: str, r: dict, batch: int, work: Path) -> dict:
    """Conversations/s: rows seen (batch x steps x conversations per row) over the summed step time."""
    train_s = sum(s["s_per_step"] for s in r["steps"])
    per_row = r["rows"] / r["sequences"]
    convs = len(r["steps"]) * batch * per_row
    ev = json.loads(_child([sys.executable, "-c", EVAL_CHILD, r["adapter"], str(SALES), "200"], work)
                    .stdout.split("RESULT", 1)[1])
    return {"run": name, "train_s": round(train_s, 1), "conversations_per_s": round(convs / train_s, 3),
            "non_pad_tokens_per_s": round(convs * r["tokens"] / r["rows"] / train_s, 1),
            "peak_rss_mb": round(r["peak_rss_kb"] / 1024), "eval_loss": round(ev["eval_loss"], 4),
            "conversations_per_row": round(per_row, 2), "memory_mode": r.get("memory_mode", ""),
            "loss": [round(s["loss"], 4) for s in r["steps"]]}


def vs_baseline(variants: dict[str, list[str]], rounds: int, steps: int, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "cache").mkdir()
        from kernel.paths import cache_root

        (work / "cache" / "models").symlink_to(cache_root() / "models")  # the materialised base, not rebuilt
        data = work / "sales200.jsonl"
        data.write_text("".join(SALES.read_text().splitlines(keepends=True)[:200]))
        results: list[dict] = []
        for k in range(rounds):  # alternating, so drift in the machine's speed hits every run alike
            for name, overrides in [("baseline", None), *variants.items()]:
                print(f"bench: round {k + 1}, {name} ...", file=sys.stderr, flush=True)
                r = run_baseline(data, steps, work) if overrides is None else \
                    run_guardtune(name, overrides, data, steps, work)
                results.append(speed_summary(name, r, 4, work) | {"round": k + 1})
                print(f"bench: {results[-1]}", file=sys.stderr, flush=True)
    write_speed(results, variants, steps, out)


def write_speed(results: list[dict], variants: dict[str, list[str]], steps: int, out: Path) -> None:
    """Medians per run and their ratios to the baseline; the loss per step of round 1."""
    names = ["baseline", *variants]
    med = {n: {k: statistics.median(r[k] for r in results if r["run"] == n)
               for k in ("conversations_per_s", "non_pad_tokens_per_s", "peak_rss_mb", "eval_loss", "train_s")}
           for n in names}
    b = med["baseline"]
    what = {"baseline": "bench/hf_baseline.py", "default": "none: train's defaults"}
    rows = [[n, what.get(n) or " ".join(variants[n]), round(m["conversations_per_s"], 3),
             round(m["conversations_per_s"] / b["conversations_per_s"], 2), round(m["non_pad_tokens_per_s"], 1),
             round(m["non_pad_tokens_per_s"] / b["non_pad_tokens_per_s"], 2), round(m["peak_rss_mb"]),
             round(m["peak_rss_mb"] / b["peak_rss_mb"], 2), round(m["eval_loss"], 4)] for n, m in med.items()]
    info = results_io.meta(config=f"SmolLM2-135M-Instruct, first 200 sales chats, LoRA r16 all-linear, alpha 32, "
                                  f"dropout 0, batch 4, cutoff 256, lr 2e-4 cosine, {steps} steps, gradient "
                                  "checkpointing, fp32", rounds=max(r["round"] for r in results))
    lines = [f"Measured {info['date']} on {info['machine']}; {info['config']}; medians of {info['rounds']} "
             "alternating rounds. Held-out loss: each adapter on sales chats 201-300.", ""]
    lines += results_io.table(["run", "overrides", "conversations/s", "x baseline", "non-pad tokens/s", "x baseline",
                               "peak RSS MB", "x baseline", "held-out loss"], rows)
    lines += ["", "Training loss per step (round 1):", ""]
    lines += results_io.table(["run", *[str(i + 1) for i in range(steps)]],
                              [[r["run"], *r["loss"]] for r in results if r["round"] == 1])
    results_io.write(out, {"meta": info, "median": med, "runs": results}, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["lora", "qlora", "dora"])
    p.add_argument("--packing", action="store_true", help="compare SFT packing with padding instead")
    p.add_argument("--rows", type=int, default=40, help="--packing: generated chats (one epoch)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--vs-baseline", action="store_true", help="train's defaults against a plain HF Trainer + PEFT")
    p.add_argument("--rounds", type=int, default=2, help="--vs-baseline: alternating rounds")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="--vs-baseline: also run `train` with these overrides (repeatable)")
    a = p.parse_args()
    if a.vs_baseline:
        variants = {"default": []} | {v[0]: v[1:] for v in a.variant or []}
        return vs_baseline(variants, a.rounds, a.steps, a.out or ROOT / "bench" / "results" / "train_speed")
    if a.packing:
        return packing_bench(a.rows, a.out or ROOT / "bench" / "results" / "train_packing")
    a.out = a.out or ROOT / "bench" / "results" / "train_methods"
    methods = ["lora"] + [m for m in a.methods if m != "lora"]  # the baseline always runs, first
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for m in methods:
            print(f"bench: {m}, {a.steps} steps ...", file=sys.stderr, flush=True)
            results.append(run_method(m, a.steps, Path(tmp)))
            print(f"bench: {results[-1]}", file=sys.stderr, flush=True)
    base = results[0]
    for r in results:
        r["s_per_step_vs_lora"] = round(r["s_per_step"] / base["s_per_step"], 2)
        r["peak_rss_vs_lora"] = round(r["peak_rss_gb"] / base["peak_rss_gb"], 2)
    info = results_io.meta(config="examples/train_lora.yaml (SmolLM2-135M, batch 4 x max_length 256, r16 "
                                  "all-linear, gradient checkpointing, fp32)", steps=a.steps)
    lines = [f"Measured {info['date']} on {info['machine']}; {info['config']}; {a.steps} steps each.", ""]
    lines += results_io.table(
        ["method", "s/step", "x LoRA", "tokens/s", "peak RSS GB", "x LoRA", "loss first -> last"],
        [[r["method"], r["s_per_step"], r["s_per_step_vs_lora"], r["tokens_per_s"], r["peak_rss_gb"],
          r["peak_rss_vs_lora"], f"{r['first_loss']} -> {r['last_loss']}"] for r in results])
    results_io.write(a.out, {"meta": info, "results": results}, lines)

if __name__ == "__main__":
    main()
