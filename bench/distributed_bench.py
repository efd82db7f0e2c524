"""1 process against 2 ranks (DDP, ZeRO-2, ZeRO-3; FSDP needs CUDA) on the same tiny LoRA run, in one session.

Each variant is the real `train` CLI in its own process tree (torchrun for the ranks). s/step and
sequences/s are medians over the logged steps after the first (start-up and the first gather are
excluded). The 1-process run is the baseline; the 2-rank runs process twice the sequences per step.

    .venv/bin/python -m bench.distributed_bench [--steps 6]
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

from bench.results_io import meta, table, write

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "1 process": {},
    "2 ranks, DDP": {"nproc": 2},
    "2 ranks, ZeRO-2": {"nproc": 2, "deepspeed": "zero2"},
    "2 ranks, ZeRO-3": {"nproc": 2, "deepspeed": "zero3"},
}


def run(name: str, over: dict, steps: int, data: Path, tmp: Path) -> dict:
    slug = name.replace(" ", "").replace(",", "-")
    cfg = {"task": "bench", "train_file": str(data), "eval_split": 0.0, "max_length": 96, "batch_size": 4,
           "rank": 8, "alpha": 16, "learning_rate": 3e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant",
           "max_steps": steps, "save_steps": 1000, "gradient_checkpointing": "false", "report_to": "none",
           "generation_samples": 0, "output_dir": str(tmp / "adapters" / slug), "run_dir": str(tmp / "runs" / slug),
           **over}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "training.cli", *[f"{k}={v}" for k, v in cfg.items()]], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (Path(cfg["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "s_per_step" in r][1:]
    world = int(over.get("nproc", 1))
    s_step = statistics.median(r["s_per_step"] for r in rows)
    return {"variant": name, "world": world, "s_per_step": round(s_step, 3),
            "sequences_per_s": round(cfg["batch_size"] * world / s_step, 2),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
            "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_distributed"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_rows, write_jsonl

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = write_jsonl(tmp / "tiny.jsonl", tiny_rows() * 4)
        results = [run(name, over, args.steps, data, tmp) for name, over in VARIANTS.items()]
    base = results[0]
    for r in results:
        r["x_1proc_s_per_step"] = round(r["s_per_step"] / base["s_per_step"], 2)
        r["x_1proc_sequences_per_s"] = round(r["sequences_per_s"] / base["sequences_per_s"], 2)
    m = meta(setup=f"SmolLM2-135M LoRA r8 all-linear, batch 4 per rank x max_length 96, fp32, gloo, {args.steps} steps; "
                   "torchrun gives each of 2 ranks 1 thread, the single process uses all cores")
    lines = [f"Measured {m['date']} on {m['machine']}; {m['setup']}.", ""]
    lines += table(["variant", "ranks", "s/step", "x 1 proc", "sequences/s", "x 1 proc", "tokens/s", "wall s"],
                   [[r["variant"], r["world"], r["s_per_step"], r["x_1proc_s_per_step"], r["sequences_per_s"],
                     r["x_1proc_sequences_per_s"], r["tokens_per_s"], r["wall_s"]] for r in results])
    write(Path(args.out), {"meta": m, "results": results}, lines)


if __name__ == "__main__":
    main()
