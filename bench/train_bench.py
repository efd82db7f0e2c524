"""Training speed and memory per PEFT method on the example config, LoRA as the baseline.

Each method runs `train examples/train_lora.yaml` in its own process (so peak RSS is its own) for
the same number of steps on the same data. Reports median s/step (first step excluded: warm-up),
trained tokens/s and peak RSS, each as a ratio to LoRA. Results: bench/results/train_methods.{json,md}.

    .venv/bin/python bench/train_bench.py [--steps 20] [--methods lora qlora dora]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["lora", "qlora", "dora"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_methods")
    a = p.parse_args()
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
