"""Serving throughput and latency: vLLM against the transformers engine (baseline), LoRA against base.

For each engine a real `guardtune serve` is started; at each concurrency level, closed-loop streaming
clients send `requests_per_level` chats with a fixed max_tokens (greedy, no early stop). Reports
output tokens/s and p50/p95 of e2e latency, TTFT and TPOT, plus ratios vLLM/transformers and
LoRA/base measured in the same run. Results: bench/results/serve.{json,md}.

    .venv/bin/python bench/serve_bench.py [--levels 1 4 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402
from serving.launcher import ServerProcess  # noqa: E402

PROMPTS = ["What does a home battery cost?", "Do panels work on cloudy days?", "How long is installation?",
           "Can I finance a system?", "What warranty comes with the panels?", "Do you install EV chargers?"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def one(c: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - t0
    ttft = ttft if ttft is not None else e2e
    return {"e2e": e2e, "ttft": ttft, "tokens": tokens, "tpot": (e2e - ttft) / max(tokens - 1, 1)}


async def level(url: str, model: str, concurrency: int, n: int, max_tokens: int) -> dict:
    queue = list(range(n))
    results: list[dict] = []

    async def client(c):
        while queue:
            i = queue.pop()
            results.append(await one(c, model, PROMPTS[i % len(PROMPTS)], max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await one(c, model, PROMPTS[0], 4)  # warm-up (and LoRA load) outside the measurement
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    tok = sum(r["tokens"] for r in results)
    row = {"concurrency": concurrency, "requests": len(results), "output_tokens": tok,
           "tokens_per_s": round(tok / wall, 1)}
    for key in ("e2e", "ttft", "tpot"):
        vals = [r[key] for r in results]
        row[f"{key}_p50_ms"] = round(pct(vals, 0.5) * 1000, 1)
        row[f"{key}_p95_ms"] = round(pct(vals, 0.95) * 1000, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-level", type=int, default=0, help="default: 2 x concurrency, at least 4")
    p.add_argument("--adapter", default="adapters/sales", help="LoRA adapter to serve as task 'sales'")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve")
    a = p.parse_args()
    adapter = Path(a.adapter).resolve()
    if not (adapter / "guardtune.json").is_file():
        raise SystemExit(f"no adapter at {adapter}: run `make demo` (or train) first")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("vllm", "transformers"):
            cfg = {"engine": engine, "adapters_root": str(adapter.parent), "tasks": {"sales": str(adapter)},
                   "state_file": f"{tmp}/{engine}-state.json", "max_model_len": 1024, "kv_cache_gb": 2,
                   "limits": {"max_concurrency": max(a.levels), "max_queue": 4 * max(a.levels),
                              "max_tokens_cap": a.max_tokens, "queue_timeout_s": 600}}
            t0 = time.time()
            with ServerProcess(cfg, Path(tmp) / engine) as srv:
                print(f"bench: {engine} ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
                for model in ("base", "sales"):
                    for c in a.levels:
                        n = a.requests_per_level or max(4, 2 * c)
                        row = {"engine": engine, "model": "lora" if model == "sales" else "base",
                               **asyncio.run(level(srv.url, model, c, n, a.max_tokens))}
                        rows.append(row)
                        print(f"bench: {row}", file=sys.stderr, flush=True)
    ratios = []
    for r in rows:
        if r["engine"] != "vllm":
            continue
        hf = next(x for x in rows if x["engine"] == "transformers" and x["model"] == r["model"]
                  and x["concurrency"] == r["concurrency"])
        base = next(x for x in rows if x["engine"] == "vllm" and x["model"] == "base" and x["concurrency"] == r["concurrency"])
        ratios.append({"model": r["model"], "concurrency": r["concurrency"],
                       "vllm_vs_transformers_tokens_per_s": round(r["tokens_per_s"] / hf["tokens_per_s"], 2),
                       "vllm_lora_vs_base_tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 2)})
    info = results_io.meta(max_tokens=a.max_tokens, model="SmolLM2-135M-Instruct fp32", adapter=str(a.adapter))
    lines = [f"Measured {info['date']} on {info['machine']}; {info['model']}; greedy, at most {a.max_tokens} output "
             "tokens per request; streaming clients in a closed loop.", ""]
    lines += results_io.table(
        ["engine", "model", "conc.", "tok/s", "e2e p50/p95 ms", "TTFT p50/p95 ms", "TPOT p50/p95 ms"],
        [[r["engine"], r["model"], r["concurrency"], r["tokens_per_s"], f"{r['e2e_p50_ms']} / {r['e2e_p95_ms']}",
          f"{r['ttft_p50_ms']} / {r['ttft_p95_ms']}", f"{r['tpot_p50_ms']} / {r['tpot_p95_ms']}"] for r in rows])
    lines += [""] + results_io.table(
        ["model", "conc.", "vLLM / transformers tok/s", "vLLM LoRA / base tok/s"],
        [[x["model"], x["concurrency"], x["vllm_vs_transformers_tokens_per_s"],
          x["vllm_lora_vs_base_tokens_per_s"] if x["model"] == "lora" else ""] for x in ratios])
    results_io.write(a.out, {"meta": info, "rows": rows, "ratios": ratios}, lines)

if __name__ == "__main__":
    main()
