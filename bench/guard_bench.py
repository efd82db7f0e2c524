"""Guardrail and retrieval costs.

Part 1, per request (in-process, the packaged MiniLM, 2 cores): p50/p95 added latency of input
moderation, output compliance and retrieval, against the same request's end-to-end latency with
guardrails off on a real `guardtune serve` (vLLM, the example adapter).
Part 2, index scale: retrieval latency and recall@10 of the exact index against HNSW (the types and
parameters rag/index.py builds) on synthetic 384-d unit vectors of low intrinsic dimension.
Results: bench/results/guard.{json,md}.

    .venv/bin/python bench/guard_bench.py [--sizes 10000 100000 1000000] [--skip-server]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402

USER = ["What does the Vault 10 battery cost?", "Do panels work when it is cloudy?", "How long is installation?",
        "My email is sam@example.com, can you send a quote?", "Can I pay for the system monthly?",
        "Which way should my roof face?", "Is there a warranty on the wallbox?", "Book me a site survey please."]
REPLIES = ["The Vault 10 battery is about $7,900 with installation.", "Panels still make power on cloudy days.",
           "Installation usually takes one or two days.", "I'll email your quote within two days.",
           "Yes, financing runs from 5 to 20 years.", "South-facing roofs are best, but east and west work too.",
           "The wallbox has a warranty.", "Sure, I can book your free site survey."]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def per_step(n: int) -> dict:
    from guardrails.compliance import Compliance
    from guardrails.embeddings import _embed_one
    from guardrails.moderation import ModerationConfig, Moderator
    from guardrails.scripts import ScriptStore, build_store

    mod = Moderator(ModerationConfig(banned_topics={"politics": ["Who should I vote for?"]}))
    with tempfile.TemporaryDirectory() as tmp:
        build_store(ROOT / "examples/guardrails/scripts.yaml", Path(tmp) / "s", log=lambda m: None)
        comp = Compliance(ScriptStore.load(Path(tmp) / "s"), output_scanners=mod.scanners[-2:])
        steps = {"input_moderation": lambda i: mod.check(USER[i % len(USER)]),
                 "output_compliance": lambda i: comp.decide(REPLIES[i % len(REPLIES)], stage="pricing",
                                                            session_id=str(i), threshold=0.6)}
        try:
            from rag.index import KnowledgeIndex, ingest

            ingest(ROOT / "examples/kb", Path(tmp) / "kb", log=lambda m: None)
            kb = KnowledgeIndex.load(Path(tmp) / "kb")
            steps["retrieval_top5"] = lambda i: kb.search(USER[i % len(USER)], top_k=5)
        except ImportError:
            pass
        out = {}
        for name, fn in steps.items():
            fn(0)  # warm-up: model load
            times = []
            for i in range(n):
                _embed_one.cache_clear()  # each step measured standalone, without the shared embedding cache
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1000)
            out[name] = {"p50_ms": round(pct(times, 0.5), 2), "p95_ms": round(pct(times, 0.95), 2)}
            print(f"bench: {name} {out[name]}", file=sys.stderr, flush=True)
    return out


def e2e_without_guardrails(n: int, adapter: Path) -> dict:
    import httpx

    from serving.launcher import ServerProcess

    async def run(url):
        times = []
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            for i in range(n + 1):
                t0 = time.perf_counter()
                r = await c.post("/v1/chat/completions", json={
                    "model": "sales", "max_tokens": 32, "temperature": 0,
                    "messages": [{"role": "user", "content": USER[i % len(USER)]}]})
                r.raise_for_status()
                if i:  # the first request warms up the LoRA
                    times.append((time.perf_counter() - t0) * 1000)
        return times

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"engine": "vllm", "adapters_root": str(adapter.parent), "tasks": {"sales": str(adapter)},
               "state_file": f"{tmp}/state.json", "max_model_len": 1024, "kv_cache_gb": 1}
        with ServerProcess(cfg, Path(tmp)) as srv:
            times = asyncio.run(run(srv.url))
    return {"p50_ms": round(pct(times, 0.5), 1), "p95_ms": round(pct(times, 0.95), 1), "requests": n}


def synthetic(n: int, dim: int = 384, rank: int = 32, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Unit vectors near a random 32-dimensional subspace: sentence embeddings have a low intrinsic
    dimension, and uniform noise in 384-d (or tight clusters full of near-ties) would make any
    approximate index look worse than it is on real text."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(42).standard_normal((rank, dim)).astype(np.float32)
    x = rng.standard_normal((n, rank)).astype(np.float32) @ basis
    x += noise * np.linalg.norm(x, axis=1, keepdims=True) * rng.standard_normal((n, dim)).astype(np.float32) / dim**0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_scale(sizes: list[int], queries: int = 200) -> list[dict]:
    import faiss

    from rag.index import HNSW_EF_SEARCH, HNSW_M

    rows = []
    for n in sizes:
        data = synthetic(n)
        q = synthetic(queries, seed=1)
        exact = faiss.IndexFlatIP(data.shape[1])
        exact.add(data)
        t0 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(data.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(data)
        build_s = time.perf_counter() - t0
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        row = {"vectors": n, "hnsw_build_s": round(build_s, 1)}
        results = {}
        for name, index in (("exact", exact), ("hnsw", hnsw)):
            times, ids = [], []
            for v in q:
                t0 = time.perf_counter()
                _, found = index.search(v.reshape(1, -1), 10)
                times.append((time.perf_counter() - t0) * 1000)
                ids.append(found[0])
            results[name] = ids
            row[f"{name}_p50_ms"] = round(statistics.median(times), 3)
            row[f"{name}_p95_ms"] = round(pct(times, 0.95), 3)
        row["hnsw_recall_at_10"] = round(float(np.mean(
            [len(set(a) & set(b)) / 10 for a, b in zip(results["exact"], results["hnsw"])])), 4)
        row["speedup_p50"] = round(row["exact_p50_ms"] / row["hnsw_p50_ms"], 1)
        rows.append(row)
        print(f"bench: {row}", file=sys.stderr, flush=True)
        del data, exact, hnsw
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--adapter", default="adapters/sales")
    p.add_argument("--skip-server", action="store_true", help="no end-to-end baseline (no adapter needed)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "guard")
    a = p.parse_args()
    steps = per_step(a.requests)
    baseline = None if a.skip_server else e2e_without_guardrails(20, Path(a.adapter).resolve())
    scale = index_scale(a.sizes)
    info = results_io.meta(requests=a.requests)
    lines = [f"Measured {info['date']} on {info['machine']}; guardrail steps in-process with the packaged MiniLM.", ""]
    step_rows = [[k, v["p50_ms"], v["p95_ms"],
                  f"{v['p50_ms'] / baseline['p50_ms']:.1%}" if baseline else ""] for k, v in steps.items()]
    if baseline:
        step_rows.append(["request e2e, guardrails off (vLLM, LoRA, 32 tokens)", baseline["p50_ms"],
                          baseline["p95_ms"], "100%"])
    lines += results_io.table(["step", "p50 ms", "p95 ms", "share of e2e p50"], step_rows)
    lines += ["", "Exact (IndexFlatIP) against HNSW (M=32, efSearch=64) on synthetic unit vectors of intrinsic dimension 32, "
              "200 queries, k=10:", ""]
    lines += results_io.table(
        ["vectors", "exact p50/p95 ms", "HNSW p50/p95 ms", "HNSW recall@10", "speed-up p50", "HNSW build s"],
        [[r["vectors"], f"{r['exact_p50_ms']} / {r['exact_p95_ms']}", f"{r['hnsw_p50_ms']} / {r['hnsw_p95_ms']}",
          r["hnsw_recall_at_10"], r["speedup_p50"], r["hnsw_build_s"]] for r in scale])
    results_io.write(a.out, {"meta": info, "steps": steps, "baseline": baseline, "index_scale": scale}, lines)


if __name__ == "__main__":
    main()
