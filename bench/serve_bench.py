"""Serving throughput and latency on CPU, in one run: LoRA against base, guardtune against vLLM's own
OpenAI server, and guardtune's LoRA plugin (docs/lora-cpu.md) on against off.

Servers, one after another, all with the same engine settings (fp32, max_num_seqs = the highest
concurrency, 4 LoRA slots of rank 64, max_model_len 1024):

    guardtune           `guardtune serve`, vLLM engine, the plugin on (the default)
    guardtune-noplugin  the same with GUARDTUNE_LORA_CPU=0: vLLM's own CPU LoRA ops
    vllm                python -m vllm.entrypoints.openai.api_server, LoRA enabled (the plugin loads here too)
    vllm-nolora         the same without LoRA: the base model when no adapter can be served
    transformers        `guardtune serve` on the transformers engine (only with --transformers)

At each concurrency, closed-loop streaming clients send chats to the base model and to the LoRA task
`sales`: greedy, ignore_eos, a fixed max_tokens. Then, one request at a time, the time to first token
of a RAG-sized prompt (about 500 tokens) on base and LoRA; and vLLM's own benchmark client
(`vllm.benchmarks.serve`) against guardtune. Results: bench/results/serve.{json,md}.

    .venv/bin/python bench/serve_bench.py [--levels 16] [--max-tokens 64] [--transformers]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402
from bench.raw_vllm import RawVLLMServer, server_args  # noqa: E402
from bench.vllm_client import run_vllm_bench  # noqa: E402
from kernel.models import DEFAULT_BASE_MODEL, resolve_base_model  # noqa: E402
from serving.launcher import ServerProcess  # noqa: E402

PROMPTS = ["What does a home battery cost?", "Do panels work on cloudy days?", "How long is installation?",
           "Can I finance a system?", "What warranty comes with the panels?", "Do you install EV chargers?"]
FACTS = ["The Kestrel home battery stores 10 kWh and can be stacked up to three units.",
         "Panels keep producing on cloudy days, at roughly a quarter to a half of their rated output.",
         "A typical rooftop installation takes one to two days once the permit has been granted.",
         "Financing runs over five, ten or fifteen years, with no fee for paying off early.",
         "Panels carry a 25-year performance warranty and inverters a 12-year product warranty.",
         "EV chargers are installed by the same crew and can share the solar system's meter.",
         "Inspections happen within ten working days of the installation being finished.",
         "Monitoring comes through a phone app that shows production and use every five minutes."]
MODELS = {"base": "base", "lora": "sales"}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def rag_prompt(i: int) -> str:
    """About 500 tokens of retrieved passages and a question; `i` first, so no run reuses another's
    cached prefix."""
    passages = [f"[{n + 1}] {FACTS[n % len(FACTS)]} {FACTS[(n * 3 + 1) % len(FACTS)]}" for n in range(11)]
    return f"Request {i}. Answer from these passages and cite them.\n" + "\n".join(passages) + \
        "\nQuestion: How long does installation take, and what warranty do the panels have?"


async def one(c: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, {}
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    e2e = time.perf_counter() - t0
    ttft = ttft if ttft is not None else e2e
    tokens = usage.get("completion_tokens", 0)
    return {"e2e": e2e, "ttft": ttft, "tokens": tokens, "prompt_tokens": usage.get("prompt_tokens", 0),
            "tpot": (e2e - ttft) / max(tokens - 1, 1)}


def summarise(results: list[dict], wall: float) -> dict:
    tok = sum(r["tokens"] for r in results)
    row = {"requests": len(results), "output_tokens": tok, "tokens_per_s": round(tok / wall, 1)}
    for key in ("e2e", "ttft", "tpot"):
        vals = [r[key] for r in results]
        row[f"{key}_p50_ms"] = round(pct(vals, 0.5) * 1000, 1)
        row[f"{key}_p95_ms"] = round(pct(vals, 0.95) * 1000, 1)
    return row


async def level(url: str, model: str, concurrency: int, n: int, max_tokens: int) -> dict:
    queue = list(range(n))
    results: list[dict] = []

    async def client(c):
        while queue:
            i = queue.pop()
            results.append(await one(c, model, PROMPTS[i % len(PROMPTS)], max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=900) as c:
        await one(c, model, PROMPTS[0], 4)  # warm-up (and the adapter's load) outside the measurement
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, **summarise(results, wall)}


async def rag_ttft(url: str, model: str, runs: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=900) as c:
        await one(c, model, PROMPTS[0], 2)  # loads the adapter; the RAG prompts are all new to the cache
        results = [await one(c, model, rag_prompt(i), 2) for i in range(runs)]
    ttfts = [r["ttft"] * 1000 for r in results]
    return {"prompt_tokens": results[0]["prompt_tokens"], "runs": runs,
            "ttft_median_ms": round(statistics.median(ttfts), 1), "ttft_max_ms": round(max(ttfts), 1)}


def guardtune_server(tmp: Path, adapter: Path, a, engine: str = "vllm", env: dict | None = None):
    cfg = {"engine": engine, "adapters_root": str(adapter.parent), "tasks": {"sales": str(adapter)},
           "state_file": f"{tmp}/state.json", "max_model_len": 1024, "kv_cache_gb": 2,
           "max_loras": 4, "max_lora_rank": 64,
           "limits": {"max_concurrency": max(a.levels), "max_queue": 4 * max(a.levels),
                      "max_tokens_cap": max(a.max_tokens, 64), "queue_timeout_s": 900}}
    return ServerProcess(cfg, tmp, env={"GUARDTUNE_LORA_CPU": "1", **(env or {})}, ready_timeout=600)


def raw_server(tmp: Path, adapter: Path, a, lora: bool):
    tmp.mkdir(parents=True, exist_ok=True)
    args = server_args(resolve_base_model(DEFAULT_BASE_MODEL), max_num_seqs=max(a.levels), max_model_len=1024,
                       loras={"sales": adapter} if lora else None)
    return RawVLLMServer(args, tmp / "vllm.log", env={"GUARDTUNE_LORA_CPU": "1"})  # installed here: same ops


def servers(tmp: Path, adapter: Path, a) -> list[tuple[str, Callable[[], AbstractContextManager], list[str]]]:
    """(name, start, models measured) in the order they run."""
    out = [("guardtune", lambda: guardtune_server(tmp / "gt", adapter, a), ["base", "lora"]),
           ("guardtune-noplugin", lambda: guardtune_server(tmp / "gt-np", adapter, a,
                                                           env={"GUARDTUNE_LORA_CPU": "0"}), ["base", "lora"]),
           ("vllm", lambda: raw_server(tmp / "vllm", adapter, a, lora=True), ["base", "lora"]),
           ("vllm-nolora", lambda: raw_server(tmp / "vllm-nl", adapter, a, lora=False), ["base"])]
    if a.transformers:
        out.append(("transformers", lambda: guardtune_server(tmp / "hf", adapter, a, engine="transformers"),
                    ["base", "lora"]))
    return out


def run_server(name: str, srv, models: list[str], a, tmp: Path) -> tuple[list[dict], list[dict], dict | None]:
    rows, ttft = [], []
    for model in models:
        for c in a.levels:
            n = a.requests_per_level or 3 * c
            row = {"server": name, "model": model, **asyncio.run(level(srv.url, MODELS[model], c, n, a.max_tokens))}
            rows.append(row)
            log(f"{row}")
        if name.startswith("guardtune"):
            runs = a.ttft_runs if name == "guardtune" else 1  # without the plugin one LoRA run takes a minute
            ttft.append({"server": name, "model": model, **asyncio.run(rag_ttft(srv.url, MODELS[model], runs))})
            log(f"{ttft[-1]}")
    client = None
    if name == "guardtune":
        client = run_vllm_bench(srv.url, MODELS["lora"], str(resolve_base_model(DEFAULT_BASE_MODEL)),
                                num_prompts=a.client_prompts, concurrency=max(a.levels), input_len=128,
                                output_len=a.max_tokens, result_path=tmp / "vllm_client.json")
        log(f"vllm.benchmarks.serve: {client}")
    return rows, ttft, client


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def find(rows: list[dict], server: str, model: str, c: int) -> dict | None:
    return next((r for r in rows if r["server"] == server and r["model"] == model and r["concurrency"] == c), None)


def ratio(a: dict | None, b: dict | None, key: str = "tokens_per_s") -> float | None:
    return round(a[key] / b[key], 2) if a and b and b[key] else None


def ratios(rows: list[dict], ttft: list[dict], levels: list[int]) -> list[dict]:
    out = []
    for c in levels:
        gt = {m: find(rows, "guardtune", m, c) for m in MODELS}
        out.append({"concurrency": c,
                    "lora_vs_base": ratio(gt["lora"], gt["base"]),
                    "lora_engine_base_vs_no_lora_engine": ratio(find(rows, "vllm", "base", c),
                                                                find(rows, "vllm-nolora", "base", c)),
                    "guardtune_vs_vllm_base": ratio(gt["base"], find(rows, "vllm", "base", c)),
                    "guardtune_vs_vllm_lora": ratio(gt["lora"], find(rows, "vllm", "lora", c)),
                    "plugin_on_vs_off_lora": ratio(gt["lora"], find(rows, "guardtune-noplugin", "lora", c)),
                    "plugin_on_vs_off_base": ratio(gt["base"], find(rows, "guardtune-noplugin", "base", c))})
    t = {(r["server"], r["model"]): r for r in ttft}
    for server in ("guardtune", "guardtune-noplugin"):
        if (server, "lora") in t and (server, "base") in t:
            out.append({"rag_ttft_lora_vs_base": ratio(t[(server, "lora")], t[(server, "base")], "ttft_median_ms"),
                        "server": server})
    return out


def report(info: dict, rows, ttft, client, rat, a) -> list[str]:
    lines = [f"Measured {info['date']} on {info['machine']}; {info['model']}; greedy, ignore_eos, {a.max_tokens} "
             "output tokens per request; streaming clients in a closed loop; every server with the same engine "
             "settings (max_num_seqs = concurrency, 4 LoRA slots, rank 64).", ""]
    lines += results_io.table(
        ["server", "model", "conc.", "tok/s", "e2e p50/p95 ms", "TTFT p50/p95 ms", "TPOT p50/p95 ms"],
        [[r["server"], r["model"], r["concurrency"], r["tokens_per_s"], f"{r['e2e_p50_ms']} / {r['e2e_p95_ms']}",
          f"{r['ttft_p50_ms']} / {r['ttft_p95_ms']}", f"{r['tpot_p50_ms']} / {r['tpot_p95_ms']}"] for r in rows])
    lines += ["", "Ratios in this run (bars: LoRA/base >= 0.85; base on a LoRA engine / engine without LoRA >= 0.95; "
              "guardtune / vLLM's server >= 0.95):", ""]
    thr = [r for r in rat if "concurrency" in r]
    lines += results_io.table(
        ["conc.", "LoRA / base", "LoRA-engine base / no-LoRA base", "guardtune / vLLM base", "guardtune / vLLM LoRA",
         "plugin on / off, LoRA", "plugin on / off, base"],
        [[r["concurrency"], r["lora_vs_base"], r["lora_engine_base_vs_no_lora_engine"], r["guardtune_vs_vllm_base"],
          r["guardtune_vs_vllm_lora"], r["plugin_on_vs_off_lora"], r["plugin_on_vs_off_base"]] for r in thr])
    lines += ["", "Time to first token of a RAG-sized prompt, one request at a time, each prompt new to the "
              "prefix cache (bar: LoRA within 1.5x of base):", ""]
    by = {r["server"]: r["rag_ttft_lora_vs_base"] for r in rat if "server" in r}
    lines += results_io.table(
        ["server", "model", "prompt tokens", "runs", "TTFT median ms", "TTFT max ms", "LoRA / base"],
        [[r["server"], r["model"], r["prompt_tokens"], r["runs"], r["ttft_median_ms"], r["ttft_max_ms"],
          by.get(r["server"], "") if r["model"] == "lora" else ""] for r in ttft])
    if client:
        lines += ["", f"vLLM's own benchmark client (`vllm.benchmarks.serve`, backend openai-chat, random dataset, "
                  f"{client.get('num_prompts')} prompts) against `guardtune serve`, task sales: "
                  f"{client.get('completed')} completed, {client.get('failed')} failed, "
                  f"{client.get('output_throughput', 0):.1f} output tok/s, "
                  f"median TTFT {client.get('median_ttft_ms', 0):.0f} ms."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, nargs="+", default=[16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=0, help="default: 3 x concurrency")
    p.add_argument("--ttft-runs", type=int, default=3)
    p.add_argument("--client-prompts", type=int, default=32, help="prompts for vLLM's benchmark client")
    p.add_argument("--transformers", action="store_true", help="also measure the transformers engine")
    p.add_argument("--adapter", default="adapters/sales", help="LoRA adapter to serve as task 'sales'")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve")
    a = p.parse_args()
    adapter = Path(a.adapter).resolve()
    if not (adapter / "guardtune.json").is_file():
        raise SystemExit(f"no adapter at {adapter}: run `make demo` (or train) first")
    rows, ttft, client = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, start, models in servers(Path(tmp), adapter, a):
            t0 = time.time()
            with start() as srv:
                log(f"{name} ready in {time.time() - t0:.0f} s")
                r, t, c = run_server(name, srv, models, a, Path(tmp))
                rows, ttft, client = rows + r, ttft + t, client or c
    rat = ratios(rows, ttft, a.levels)
    info = results_io.meta(max_tokens=a.max_tokens, model="SmolLM2-135M-Instruct fp32", adapter=str(a.adapter))
    results_io.write(a.out, {"meta": info, "rows": rows, "rag_ttft": ttft, "ratios": rat, "vllm_client": client},
                     report(info, rows, ttft, client, rat, a))


if __name__ == "__main__":
    main()
