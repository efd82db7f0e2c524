"""The memory estimator against measured peak RSS of real `train` runs on this CPU.

For each configuration it writes a synthetic chat dataset whose every row is exactly `seq`
tokens long (one long reply, cut to its last `seq` tokens by the same truncation `train` uses), so
every batch is exactly batch x seq with no padding. It then runs `train` in its own process for a
few steps and reads the process's peak RSS (ru_maxrss), while a sampler thread records in which
phase (load, forward, backward, optimizer step, ...) the peak happened. The estimator
(training/estimate/) is run on the same config and the error is reported. A separate process
measures the runtime baseline (imports, tokenizer, data) that the estimator states as a constant.
Two configurations run again with `host_memory: fast` against the default `bounded`, for the RSS
and s/step ratios of that setting (training/host_memory.py).
Results: bench/results/estimate.{json,md}.

    .venv/bin/python bench/estimate_bench.py [--steps 3] [--only lora qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402

# Each measured configuration: method, batch, sequence length, gradient checkpointing.
CONFIGS = [
    ("lora", 4, 128, False),
    ("lora", 4, 384, False),
    ("lora", 4, 384, True),
    ("qlora", 4, 128, False),
    ("qlora", 4, 384, False),
    ("full", 4, 128, False),
    ("full", 4, 384, False),
    ("prefix_tuning", 4, 128, False),
    ("prefix_tuning", 4, 384, False),
]
# `train` defaults to host_memory: bounded on CPU (training/host_memory.py). These run again with
# host_memory: fast, glibc's own dynamic threshold, to show what the setting costs in s/step and
# saves in peak RSS, in the same run.
FAST_AGAINST_BOUNDED = [("lora", 4, 384, False), ("lora", 4, 384, True)]

# The child process: run `train` with a sampler thread that tracks RSS per phase.
CHILD = r"""
import json, os, resource, sys, threading, time
from training.host_memory import prepare_process_env
prepare_process_env()  # what the `train` CLI does before torch is imported
PAGE = os.sysconf("SC_PAGE_SIZE")
state = {"phase": "import", "peak": 0, "peak_phase": "import", "phases": {}}

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

def sample():
    while True:
        r, p = rss(), state["phase"]
        state["phases"][p] = max(state["phases"].get(p, 0), r)
        if r > state["peak"]:
            state["peak"], state["peak_phase"] = r, p
        time.sleep(0.005)

threading.Thread(target=sample, daemon=True).start()

def phase(name, fn):
    def wrapped(*a, **k):
        state["phase"] = name
        return fn(*a, **k)
    return wrapped

MODE = sys.argv[1]
if MODE == "baseline":
    # What every run holds before the model exists: the same imports, the tokenizer, the data.
    from kernel.models import resolve_base_model
    from training.config import load_config
    from training.data.dataset import prepare
    from transformers import AutoTokenizer, Trainer  # noqa: F401
    import peft, datasets  # noqa: F401
    cfg = load_config(None, sys.argv[2:])
    base = resolve_base_model(cfg.base_model, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(base)
    state["phase"] = "data"
    prepare(cfg, tok, log=lambda m: None)
    code = 0
else:
    import torch, transformers
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from training import peft_setup
    from training.cli import main
    peft_setup.load_base = phase("load", peft_setup.load_base)
    peft_setup.wrap = phase("wrap", peft_setup.wrap)
    transformers.Trainer.compute_loss = phase("forward", transformers.Trainer.compute_loss)
    torch.autograd.backward = phase("backward", torch.autograd.backward)
    register_optimizer_step_pre_hook(lambda *a: state.__setitem__("phase", "optimizer"))
    register_optimizer_step_post_hook(lambda *a: state.__setitem__("phase", "between steps"))
    transformers.Trainer.train = phase("train", transformers.Trainer.train)
    _train = transformers.Trainer.train
    def train_then_mark(*a, **k):
        out = _train(*a, **k)
        state["phase"] = "after training"
        return out
    transformers.Trainer.train = train_then_mark
    code = main(sys.argv[2:])
print("PEAK_JSON " + json.dumps({"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 "sampled_peak": state["peak"], "peak_phase": state["peak_phase"],
                                 "phases": state["phases"]}), flush=True)
sys.exit(code)
"""

# Published GPU figures (decimal GB) and the estimate for the same setting. `compare` picks what the
# source counts: the per-device total, the model states (weights + gradients + optimizer, ZeRO's
# quantity) or the weights alone. `tol` is the ratio band the tests hold the estimate to; None
# where the source counts something differently (said in the note).
LF = "LLaMA-Factory README, Hardware Requirement table (marked estimated; github.com/hiyouga/LLaMA-Factory)"
ZERO = "ZeRO paper, Rajbhandari et al. 2020 (arXiv:1910.02054), Figure 1: 7.5B params, 64 GPUs, mixed-precision Adam"
QLORA = "QLoRA paper, Dettmers et al. 2023 (arXiv:2305.14314)"
HF = "HF Transformers docs, Model training anatomy (huggingface.co/docs/transformers/model_memory_anatomy)"
GPU_RUN = dict(device="cuda", batch_size=1, max_length=512, gradient_checkpointing=True)
PUBLISHED = [
    (LF, "7B full, bf16 AMP (18x GB)", "llama-2-7b", dict(method="full", precision="mixed"), 120, "total", 0.2,
     "AMP with fp32 master weights; the table states no batch or length"),
    (LF, "7B full, pure_bf16 (8x GB)", "llama-2-7b", dict(method="full", precision="bf16"), 60, "total", 0.2, ""),
    (LF, "7B LoRA, 16-bit (2x GB)", "llama-2-7b", dict(method="lora"), 16, "total", 0.2, ""),
    (LF, "7B QLoRA, 4-bit (x/2 GB)", "llama-2-7b", dict(method="qlora"), 6, "total", 0.2, ""),
    (LF, "70B full, bf16 AMP", "llama-2-70b", dict(method="full", precision="mixed"), 1200, "total", 0.2, ""),
    (LF, "70B full, pure_bf16", "llama-2-70b", dict(method="full", precision="bf16"), 600, "total", 0.2, ""),
    (LF, "70B LoRA, 16-bit", "llama-2-70b", dict(method="lora"), 160, "total", 0.2, ""),
    (LF, "70B QLoRA, 4-bit", "llama-2-70b", dict(method="qlora"), 48, "total", 0.2, ""),
    (ZERO, "baseline DP: 16 bytes/param", "llama-2-7b", dict(method="full", precision="mixed", devices=64), 120,
     "states", 0.05, "per parameter, scaled to 7.5B"),
    (ZERO, "ZeRO-1 (P_os)", "llama-2-7b", dict(method="full", precision="mixed", devices=64, zero_stage=1), 31.4,
     "states", 0.05, "per parameter, scaled to 7.5B"),
    (ZERO, "ZeRO-2 (P_os+g)", "llama-2-7b", dict(method="full", precision="mixed", devices=64, zero_stage=2), 16.6,
     "states", 0.05, "per parameter, scaled to 7.5B"),
    (ZERO, "ZeRO-3 (P_os+g+p)", "llama-2-7b", dict(method="full", precision="mixed", devices=64, zero_stage=3), 1.9,
     "states", 0.05, "per parameter, scaled to 7.5B; the total adds two gathered layers the paper leaves out"),
    (QLORA, "LLaMA-7B 4-bit base model: 5,048 MB (Sec. 2)", "llama-2-7b", dict(method="qlora"), 5.048, "weights",
     0.15, "ours keeps embeddings and head in fp32 (prepare_model_for_kbit_training); the paper's figure "
           "is a measured footprint that may hold buffers ours does not"),
    (QLORA, "65B QLoRA fits one 48 GB GPU (abstract)", "llama-65b", dict(method="qlora"), 48, "total", None,
     "an upper bound, not a measurement: the estimate should stay below it"),
    (QLORA, "65B 16-bit full finetuning: >780 GB (Sec. 1)", "llama-65b", dict(method="full", precision="mixed"),
     780, "total", None, "the paper counts 12 bytes/param (no fp32 master copy); with it, 16"),
    (HF, "mixed-precision AdamW: 18 bytes/param", "llama-2-7b", dict(method="full", precision="mixed"),
     18 * 6.738415616, "states", None, "HF counts a 16-bit weight copy (2 bytes/param) that autocast "
                                       "makes per op; ours follows ZeRO's 16"),
]


def published_rows() -> list[dict]:
    """Each published figure beside the estimate of what it counts, with the ratio."""
    from training.estimate import EstimateConfig, estimate, resolve_shape
    from training.estimate.memory import model_states_bytes

    rows = []
    for source, claim, model, over, value_gb, compare, tol, note in PUBLISHED:
        cfg = EstimateConfig(model=model, **{**GPU_RUN, **over})
        shape = resolve_shape(model)
        est = estimate(cfg, shape)
        ours = {"total": est.total, "weights": est.weights, "states": model_states_bytes(cfg, shape)}[compare]
        if source == ZERO:  # the paper's model has 7.5B parameters: compare per parameter
            ours = ours / shape.total_params() * 7.5e9
        rows.append({"source": source, "claim": claim, "model": shape.name, "config": over, "compare": compare,
                     "published_gb": round(value_gb, 2), "estimate_gb": round(ours / 1e9, 2),
                     "ratio": round(ours / 1e9 / value_gb, 2), "tolerance": tol, "note": note})
    return rows


WORDS = ("panel", "roof", "battery", "quote", "survey", "inverter", "warranty", "tariff", "meter", "cable",
         "bracket", "sunlight", "winter", "charger", "export", "savings")


def synthetic_rows(n: int, seq: int) -> list[dict]:
    """Rows whose reply is far longer than `seq` tokens; `train` keeps each row's last `seq` tokens."""
    rows = []
    for i in range(n):
        reply = " ".join(f"{WORDS[(i + j) % len(WORDS)]} {j}" for j in range(seq))
        rows.append({"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                                  {"role": "assistant", "content": reply}]})
    return rows


def train_args(method: str, batch: int, seq: int, gc: bool, steps: int, work: Path, host_memory: str = "bounded") -> list[str]:
    name = f"{method}-{seq}-{'gc' if gc else 'nogc'}"
    data = work / f"data-{seq}.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(batch * steps, seq)))
    return [f"train_file={data}", f"method={method}", f"batch_size={batch}", f"max_length={seq}",
            f"gradient_checkpointing={str(gc).lower()}", f"max_steps={steps}", "eval_split=0",
            f"run_dir={work / ('runs-' + name)}", f"output_dir={work / ('adapter-' + name)}", "report_to=none",
            "generation_samples=0", "resume=never", "save_steps=100000", "logging_steps=1", f"task=est-{name}",
            f"host_memory={host_memory}"]


def child(mode: str, args: list[str], extra_env: dict | None = None) -> tuple[dict, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or "PEAK_JSON" not in proc.stdout:
        raise RuntimeError(f"{mode} {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("PEAK_JSON ", 1)[1].splitlines()[0]), proc.stderr


def estimate_for(method: str, batch: int, seq: int, gc: bool):
    from training.estimate import EstimateConfig, estimate

    return estimate(EstimateConfig(model="smollm2-135m-instruct", method=method, batch_size=batch,
                                   max_length=seq, gradient_checkpointing=gc, device="cpu"))


def measure(method: str, batch: int, seq: int, gc: bool, steps: int, work: Path, host_memory: str = "bounded") -> dict:
    t0 = time.time()
    m, err = child("train", train_args(method, batch, seq, gc, steps, work, host_memory))
    step_s = [float(x) for x in re.findall(r"s_per_step ([0-9.]+)", err)][1:]  # the first step warms up
    est = estimate_for(method, batch, seq, gc)
    measured, predicted = m["ru_maxrss"] / 2**30, est.total / 2**30
    return {
        "method": method, "batch": batch, "seq": seq, "gradient_checkpointing": gc,
        "measured_gib": round(measured, 3), "predicted_gib": round(predicted, 3),
        "error_pct": round(100 * (predicted - measured) / measured, 1), "peak_phase": m["peak_phase"],
        "breakdown_gib": {k: round(v / 2**30, 3) for k, v in est.parts().items()}, "peak_moment": est.moment,
        "phase_peaks_gib": {k: round(v / 2**30, 3) for k, v in m["phases"].items()},
        "wall_s": round(time.time() - t0, 1), "host_memory": host_memory,
        "s_per_step": round(sum(step_s) / len(step_s), 2) if step_s else None,
    }


def rows_with_prediction(r: dict) -> dict:
    est = estimate_for(r["method"], r["batch"], r["seq"], r["gradient_checkpointing"])
    r["predicted_gib"] = round(est.total / 2**30, 3)
    r["error_pct"] = round(100 * (r["predicted_gib"] - r["measured_gib"]) / r["measured_gib"], 1)
    r["breakdown_gib"] = {k: round(v / 2**30, 3) for k, v in est.parts().items()}
    r["peak_moment"] = est.moment
    return r


def rescore(out: Path) -> None:
    data = json.loads(out.with_suffix(".json").read_text())
    data["results"] = [rows_with_prediction(r) for r in data["results"]]
    data["fast"] = [rows_with_prediction(r) for r in data.get("fast", [])]
    report(out, data["meta"], data["results"], data["fast"], data.get("failed", []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer states exist from step 2 on; s/step skips step 1")
    p.add_argument("--only", nargs="+", help="methods to run (default: all in CONFIGS)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "estimate")
    p.add_argument("--rescore", action="store_true",
                   help="keep the measurements in OUT.json, recompute only the predictions (after a model change)")
    a = p.parse_args()
    from training.estimate import CPU_RUNTIME_BYTES

    if a.rescore:
        return rescore(a.out)

    configs = [c for c in CONFIGS if not a.only or c[0] in a.only]
    results, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, _ = child("baseline", train_args("lora", 4, 128, False, a.steps, work))
        print(f"bench: runtime baseline {base['ru_maxrss'] / 2**30:.3f} GiB measured, "
              f"{CPU_RUNTIME_BYTES / 2**30:.3f} GiB stated in training/estimate/memory.py", file=sys.stderr, flush=True)
        for method, batch, seq, gc in configs:
            print(f"bench: {method} batch {batch} x {seq}, gc={gc}, {a.steps} steps ...", file=sys.stderr, flush=True)
            try:
                results.append(measure(method, batch, seq, gc, a.steps, work))
            except RuntimeError as exc:  # reported, not hidden: the table says which rows are missing
                failed.append({"method": method, "seq": seq, "reason": str(exc).strip().splitlines()[-1]})
                print(f"bench: failed: {failed[-1]}", file=sys.stderr, flush=True)
                continue
            print(f"bench: {results[-1]}", file=sys.stderr, flush=True)
        fast = []
        for method, batch, seq, gc in FAST_AGAINST_BOUNDED:
            if a.only and method not in a.only:
                continue
            fast.append(measure(method, batch, seq, gc, a.steps, work, host_memory="fast"))
            print(f"bench: host_memory fast {fast[-1]}", file=sys.stderr, flush=True)
    info = results_io.meta(model="SmolLM2-135M-Instruct (fp32, CPU)", steps=a.steps,
                           runtime_baseline_measured_gib=round(base["ru_maxrss"] / 2**30, 3),
                           runtime_baseline_stated_gib=round(CPU_RUNTIME_BYTES / 2**30, 3))
    report(a.out, info, results, fast, failed)


def fast_lines(results: list[dict], fast: list[dict]) -> list[str]:
    """host_memory: fast against the bounded row of the same configuration, as ratios."""
    key = lambda r: (r["method"], r["batch"], r["seq"], r["gradient_checkpointing"])  # noqa: E731
    bounded = {key(r): r for r in results}
    rows = []
    for f in fast:
        b = bounded.get(key(f))
        if not b or not b.get("s_per_step") or not f.get("s_per_step"):
            continue
        rows.append([f"{f['method']} {f['batch']} x {f['seq']}, grad. ckpt {'on' if f['gradient_checkpointing'] else 'off'}",
                     b["predicted_gib"], b["measured_gib"], f["measured_gib"], round(f["measured_gib"] / b["measured_gib"], 2),
                     b["s_per_step"], f["s_per_step"], round(b["s_per_step"] / f["s_per_step"], 2)])
    if not rows:
        return []
    return ["", "`host_memory: fast` (glibc's dynamic mmap threshold) against the default `bounded`, same run and "
                "configuration: what the default saves in peak RSS and costs in s/step.", ""] + results_io.table(
        ["configuration", "predicted GiB", "bounded GiB", "fast GiB", "fast / bounded RSS", "bounded s/step",
         "fast s/step", "bounded / fast time"], rows)


def report(out: Path, info: dict, results: list[dict], fast: list[dict], failed: list[dict]) -> None:
    published = published_rows()
    lines = [f"Measured {info['date']} on {info['machine']}; {info['model']}, `train` for {info['steps']} steps on "
             f"synthetic rows of exactly the stated length (no padding); peak RSS is the process's ru_maxrss. "
             f"Runtime baseline (imports, tokenizer, data, no model): {info['runtime_baseline_measured_gib']} GiB "
             f"measured, {info['runtime_baseline_stated_gib']} GiB stated in the estimator.", ""]
    lines += results_io.table(
        ["method", "batch x seq", "grad. ckpt", "weights", "optimizer", "activations", "runtime",
         "predicted GiB", "measured GiB", "error", "measured peak in", "s/step"],
        [[r["method"], f"{r['batch']} x {r['seq']}", "on" if r["gradient_checkpointing"] else "off",
          r["breakdown_gib"]["weights"], r["breakdown_gib"]["optimizer"], r["breakdown_gib"]["activations"],
          r["breakdown_gib"]["runtime"], r["predicted_gib"], r["measured_gib"], f"{r['error_pct']:+}%",
          r["peak_phase"], r.get("s_per_step")] for r in results])
    lines += fast_lines(results, fast)
    if failed:
        lines += ["", "Not measured: " + "; ".join(f"{f['method']} at {f['seq']} ({f['reason']})" for f in failed)]
    lines += ["", "Published GPU figures against the estimate (decimal GB; estimate at batch 1 x 512, gradient "
                  "checkpointing, bf16 on CUDA unless the row says otherwise):", ""]
    lines += results_io.table(
        ["source", "figure", "model", "compares", "published GB", "estimate GB", "ratio", "note"],
        [[r["source"].split(",")[0], r["claim"], r["model"], r["compare"], r["published_gb"], r["estimate_gb"],
          r["ratio"], r["note"]] for r in published])
    results_io.write(out, {"meta": info, "results": results, "fast": fast, "failed": failed,
                             "published": published}, lines)


if __name__ == "__main__":
    main()
