"""Guardrail and retrieval costs.

Part 1, per request (in-process, the packaged MiniLM, 2 cores): p50/p95 added latency of input
moderation, output compliance and retrieval, against the same request's end-to-end latency with
guardrails off on a real `guardtune serve` (vLLM, the example adapter).
Part 2, index scale: retrieval latency and recall@10 of the exact index against HNSW (the types and
parameters rag/index.py builds) on synthetic 384-d unit vectors of low intrinsic dimension.
Part 3, hostile sizes: each input scanner's time on 1 MB of adversarial text (worst over the shapes),
and the backtracking e-mail pattern the scanners no longer use, timed in the same run for scale.
Part 4: the worst /health latency on a guarded vLLM server while 1 MB hostile requests are in
flight, against the same server idle.
Part 5: detection on the classifier's held-out test split: the classifier against the injection
patterns plus MiniLM similarity (the check before it), per category and language (bench/detection.py).
Results: bench/results/guard.{json,md}. --scan-only reruns part 3 alone, --health-only part 4 alone,
--detection-only part 5 alone (--external DIR adds sets kept outside the repository); each keeps the
other parts' results.

    .venv/bin/python bench/guard_bench.py [--sizes 10000 100000 1000000] [--skip-server]
        [--scan-only|--health-only|--detection-only [--external DIR]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import detection, results_io  # noqa: E402

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
    from guardrails.moderation import ModerationConfig, Moderator
    from guardrails.scripts import ScriptStore, build_store
    from kernel.encoder import cache_clear

    mod = Moderator(ModerationConfig(banned_topics={"politics": ["Who should I vote for?"]}))
    with tempfile.TemporaryDirectory() as tmp:
        build_store(ROOT / "examples/guardrails/scripts.yaml", Path(tmp) / "s", log=lambda m: None)
        comp = Compliance(ScriptStore.load(Path(tmp) / "s"), output_scanners=[s for s in mod.scanners if s.name in ("pii", "banned_topics")])
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
                cache_clear()  # each step measured standalone, without the shared embedding cache
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


MB = 1_000_000
# Units repeated to 1 MB: the shapes that made the backtracking patterns quadratic, the ones that make the
# RE2 replacements resume most often, the ones Normalise grows or strips (tests/test_scanner_bounds.py
# times every scanner on each of them).
HOSTILE = {
    "a": "a", "a.": "a.", "a50@": "a" * 50 + "@", "a@a.": "a@a.", "emails": "a@b.cc ",
    "1 ": "1 ", "1-": "1-", "1.": "1.", "digits": "1", "cards": "4111 1111 1111 1111 ", "ids": "11010519491231002X ",
    "17 digits X": "1" * 17 + "X", "+1 (": "+1 (", "(555) ": "(555) ", "x555 123 4567 ": "x555 123 4567 ",
    "1234 1234 1234x": "1234 1234 1234x", "x mobile": "x13812345678",
    "ignore ": "ignore ", "ignore all ": "ignore all ", "reveal the system ": "reveal the system ",
    "pretend no ": "pretend no ", "ignoriere alle ": "ignoriere alle ", "中": "中", "忽略之前": "忽略之前",
    "扮演没有": "扮演没有中", "nfkc x18": "\ufdfa", "zero-width": "i\u200bg\u200bn\u200bo\u200br\u200be\u200b ",
    "fullwidth": "ｉｇｎｏｒｅ ", "marks": "a\u0301", "lone surrogate": "a\ud800",
}
# Keywords of two Chinese patterns in random order, none of them completing a match: the text that
# most fills RE2's DFA cache with `.{0,12}` gap states, so RE2 falls back to its (linear) NFA.
_SOUP_WORDS = ["忽略", "之前", "扮演", "没有", "中"]


def megabyte(unit: str) -> str:
    return (unit * (MB // len(unit) + 1))[:MB]


def keyword_soup(seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(_SOUP_WORDS) for _ in range(MB // 2 + 1))[:MB]


def hostile_scan(repeats: int = 3) -> dict:
    """Per scanner, the worst time (best of `repeats`) over the hostile shapes of 1 MB; the old
    backtracking e-mail pattern against the RE2 PII scanner on the issue's 'a' strings."""
    from guardrails.moderation import ModerationConfig, build_scanners
    from guardrails.scanners.pii import PII
    from kernel.encoder import cache_clear

    scanners = build_scanners(ModerationConfig(banned_topics={"politics": ["Who should I vote for?"]}))
    scanners.append(PII(action="block"))
    for s in scanners:
        s.scan("warm up")
    shapes = {name: megabyte(unit) for name, unit in HOSTILE.items()}
    shapes["keyword soup (zh)"] = keyword_soup()
    worst: dict[str, dict] = {}
    for shape, text in shapes.items():
        for s in scanners:
            key = s.name if s.name != "pii" else f"pii ({s.action})"
            times = []
            for _ in range(repeats):
                cache_clear()  # each scanner pays for its own embedding windows
                t0 = time.perf_counter()
                s.scan(text)
                times.append((time.perf_counter() - t0) * 1000)
            ms = round(min(times), 1)
            if ms > worst.get(key, {"ms": -1})["ms"]:
                worst[key] = {"ms": ms, "shape": shape}
        print(f"bench: hostile {shape!r} done", file=sys.stderr, flush=True)
    old_email = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")  # what pii.py used, on `re`
    baseline = []
    for n in (20_000, 60_000):
        text = "a" * n
        t0 = time.perf_counter()
        old_email.findall(text)
        old_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        PII().scan(text)
        new_ms = (time.perf_counter() - t0) * 1000
        baseline.append({"chars": n, "re_email_ms": round(old_ms, 1), "re2_pii_ms": round(new_ms, 2),
                         "ratio": round(old_ms / max(new_ms, 1e-3))})
        print(f"bench: {baseline[-1]}", file=sys.stderr, flush=True)
    return {"meta": results_io.meta(shapes=len(shapes), input_chars=MB, repeats=repeats), "worst": worst,
            "email_baseline": baseline}


def health_under_load(seconds: float = 20.0, probes_per_s: float = 10.0) -> dict:
    """The worst /health latency while 1 MB hostile requests are in flight on a guarded vLLM server with
    keys, against /health on the same server idle (the baseline, same run).

    Three kinds of hostile request, two clients each, back to back: a 1 MB string to /v1/moderations
    and a 1 MB chat turn (both refused by the size caps, before any scan), and the most scanning one
    request may ask for: 32 moderation inputs of `max_input_chars` hostile characters each (about 1 MB,
    every byte scanned)."""
    from serving.launcher import ServerProcess

    key, bodies = "bench-user", _hostile_bodies()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"engine": "vllm", "adapters_root": f"{tmp}/adapters", "state_file": f"{tmp}/state.json",
               "api_keys": [key], "max_model_len": 1024, "kv_cache_gb": 1,
               "limits": {"max_body_bytes": 8 << 20},  # room for 1M multi-byte characters, JSON-escaped
               "guardrails": {"audit_db": f"{tmp}/audit.db"}}
        with ServerProcess(cfg, Path(tmp)) as srv:
            idle = _probe_health(srv.url, 50, probes_per_s)
            stop, sent = threading.Event(), {name: [] for name in bodies}

            workers = [threading.Thread(target=_hammer, args=(srv.url, key, *bodies[name], stop, sent[name]))
                       for name in bodies for _ in range(2)]
            for w in workers:
                w.start()
            time.sleep(2)
            loaded = _probe_health(srv.url, int(seconds * probes_per_s), probes_per_s)
            stop.set()
            for w in workers:
                w.join()
    summary = {name: {"requests": len(v), "statuses": sorted({s for s, _ in v}),
                      "p50_ms": round(pct([t for _, t in v], 0.5), 1)} for name, v in sent.items()}
    out = {"meta": results_io.meta(probes=len(loaded), seconds=seconds),
           "idle": {"p50_ms": round(pct(idle, 0.5), 2), "max_ms": round(max(idle), 2)},
           "loaded": {"p50_ms": round(pct(loaded, 0.5), 2), "p95_ms": round(pct(loaded, 0.95), 2),
                      "max_ms": round(max(loaded), 2)},
           "hostile": summary}
    out["worst_ratio"] = round(out["loaded"]["max_ms"] / max(out["idle"]["max_ms"], 1e-3), 1)
    print(f"bench: /health {out}", file=sys.stderr, flush=True)
    return out


def _hostile_bodies() -> dict[str, tuple[str, dict]]:
    """name -> (path, body) of the three hostile requests `health_under_load` sends."""
    from serving.config import Limits

    cap = Limits().max_input_chars
    shapes = [u for name, u in HOSTILE.items() if name != "lone surrogate"]  # the API refuses those at parse
    scanned = [megabyte(shapes[i % len(shapes)])[:cap] for i in range(32)]
    return {"moderation 1 MB (refused)": ("/v1/moderations", {"input": "a" * MB}),
            "chat 1 MB (refused)": ("/v1/chat/completions",
                                    {"model": "base", "messages": [{"role": "user", "content": "a" * MB}]}),
            "moderation 32 x 32k hostile (scanned)": ("/v1/moderations", {"input": scanned})}


def _probe_health(url: str, n: int, probes_per_s: float) -> list[float]:
    """`n` /health latencies in ms, `probes_per_s` apart."""
    import httpx

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        httpx.get(f"{url}/health", timeout=30).raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
        time.sleep(1 / probes_per_s)
    return times


def _hammer(url: str, key: str, path: str, body: dict, stop: threading.Event, sent: list) -> None:
    """Send `body` to `path` back to back until `stop`; appends (status, ms) to `sent`."""
    import httpx

    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            status = c.post(path, json=body).status_code
            sent.append((status, (time.perf_counter() - t0) * 1000))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--adapter", default="adapters/sales")
    p.add_argument("--skip-server", action="store_true", help="no end-to-end baseline (no adapter needed)")
    p.add_argument("--scan-only", action="store_true", help="only part 3 (hostile sizes); keep the rest of the results")
    p.add_argument("--health-only", action="store_true",
                   help="only part 4 (/health under hostile load); keep the rest of the results")
    p.add_argument("--detection-only", action="store_true",
                   help="only part 5 (detection on the test split); keep the rest of the results")
    p.add_argument("--external", type=Path, metavar="DIR", help="part 5 also scores the *.jsonl sets in DIR")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "guard")
    a = p.parse_args()
    only = a.scan_only or a.health_only or a.detection_only
    if only:
        previous = a.out.with_suffix(".json")
        payload = json.loads(previous.read_text()) if previous.exists() else {}
    else:
        steps = per_step(a.requests)
        baseline = None if a.skip_server else e2e_without_guardrails(20, Path(a.adapter).resolve())
        scale = index_scale(a.sizes)
        payload = {"meta": results_io.meta(requests=a.requests), "steps": steps, "baseline": baseline,
                   "index_scale": scale}
    if a.scan_only or not only:
        payload["hostile_scan"] = hostile_scan()
    if a.health_only or not only:
        payload["health_under_load"] = health_under_load()
    if a.detection_only or not only:
        payload["detection"] = detection.run(a.external)
    results_io.write(a.out, payload, per_request_lines(payload) + hostile_lines(payload.get("hostile_scan"))
                     + health_lines(payload.get("health_under_load")) + detection.lines(payload.get("detection")))


def per_request_lines(payload: dict) -> list[str]:
    """Parts 1 and 2, as markdown."""
    if "steps" not in payload:
        return []
    info, steps, baseline, scale = payload["meta"], payload["steps"], payload["baseline"], payload["index_scale"]
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
    return lines + [""]


def hostile_lines(scan: dict | None) -> list[str]:
    """Part 3, as markdown."""
    if scan is None:
        return []
    info = scan["meta"]
    lines = [f"Scan time per scanner for 1 MB adversarial input (measured {info['date']} on {info['machine']}): "
             f"the worst of {info['shapes']} shapes, best of {info['repeats']} runs each, embedding cache cleared "
             "before each scan:", ""]
    lines += results_io.table(["scanner", "worst ms", "worst shape"],
                              [[k, v["ms"], f"`{v['shape']!r}`"] for k, v in scan["worst"].items()])
    lines += ["", "The e-mail pattern on Python's backtracking `re` (what pii.py ran before) against the whole RE2 PII "
              "scanner, same run, on a string of `a`:", ""]
    lines += results_io.table(["characters", "`re` e-mail pattern ms", "RE2 PII scan ms", "ratio"],
                              [[r["chars"], r["re_email_ms"], r["re2_pii_ms"], f"{r['ratio']}x"]
                               for r in scan["email_baseline"]])
    return lines + [""]


def health_lines(health: dict | None) -> list[str]:
    """Part 4, as markdown."""
    if health is None:
        return []
    info, idle, loaded = health["meta"], health["idle"], health["loaded"]
    lines = [f"`/health` while 1 MB hostile requests are in flight (measured {info['date']} on {info['machine']}; "
             f"guarded vLLM server with keys, {info['probes']} probes over {info['seconds']:g} s, two clients per "
             "hostile kind, back to back):", ""]
    lines += results_io.table(["/health", "p50 ms", "p95 ms", "max ms"],
                              [["idle (baseline)", idle["p50_ms"], "", idle["max_ms"]],
                               ["under hostile load", loaded["p50_ms"], loaded["p95_ms"], loaded["max_ms"]]])
    lines += ["", f"Worst under load / worst idle: {health['worst_ratio']}x. The hostile requests meanwhile:", ""]
    lines += results_io.table(["request", "sent", "statuses", "p50 ms"],
                              [[k, v["requests"], ", ".join(map(str, v["statuses"])), v["p50_ms"]]
                               for k, v in health["hostile"].items()])
    return lines


if __name__ == "__main__":
    main()
