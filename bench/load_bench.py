"""Overload: many more streaming clients than the server admits, for several rounds.

A real `guardtune serve` (vLLM) runs with max_concurrency + max_queue far below the number of
clients. Each client loops for `--seconds`: stream a short chat completion; on 429 sleep for the
Retry-After it was given (plus a little jitter) and try again. Every attempt must end as a
completed stream or a 429 with Retry-After; dropped connections, hangs (client timeout), 5xx,
other statuses and malformed streams are counted and must be 0. Reports p50/p95/p99 latency of
completed requests and of 429s, throughput, and the RSS of the server's whole process tree
(vLLM's engine core included) before and after each round; the growth ratio last/first round is the
check for leaks. Results: bench/results/load.{json,md}.

    .venv/bin/python bench/load_bench.py [--clients 200] [--seconds 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402
from serving.launcher import ServerProcess  # noqa: E402

PROMPTS = ["What does a home battery cost?", "Do panels work on cloudy days?", "How long is installation?",
           "Can I finance a system?", "What warranty comes with the panels?", "Do you install EV chargers?"]
FAILURES = ("dropped", "hang", "5xx", "malformed", "429_without_retry_after", "other_status")


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000, 1) if xs else None


def tree_rss_mb(pid: int) -> float:
    """RSS of the server and every descendant (vLLM's engine core is a child process)."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


async def attempt(c: httpx.AsyncClient, body: dict) -> tuple[str, float, float | None, int]:
    """One request: (outcome, seconds, retry_after, output tokens)."""
    t0 = time.perf_counter()
    try:
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                await r.aread()
                ra = r.headers.get("Retry-After")
                try:
                    retry = float(ra) if ra is not None else None
                except ValueError:
                    retry = None
                kind = "429" if retry is not None and json.loads(r.text).get("error") else "429_without_retry_after"
                return kind, time.perf_counter() - t0, retry, 0
            if r.status_code >= 500:
                await r.aread()
                return "5xx", time.perf_counter() - t0, None, 0
            if r.status_code != 200:
                await r.aread()
                return "other_status", time.perf_counter() - t0, None, 0
            finished, done, tokens = False, False, 0
            async for line in r.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data: ") or done:
                    return "malformed", time.perf_counter() - t0, None, 0
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "malformed", time.perf_counter() - t0, None, 0
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    finished = True
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            ok = finished and done
            return ("completed" if ok else "malformed"), time.perf_counter() - t0, None, tokens
    except httpx.TimeoutException:
        return "hang", time.perf_counter() - t0, None, 0
    except (httpx.TransportError, httpx.RemoteProtocolError):
        return "dropped", time.perf_counter() - t0, None, 0
    except ValueError:  # a chunk that is not JSON
        return "malformed", time.perf_counter() - t0, None, 0


async def round_(url: str, model: str, clients: int, seconds: float, max_tokens: int, timeout: float) -> dict:
    outcomes: Counter = Counter()
    lat: dict[str, list[float]] = {"completed": [], "429": []}
    tokens = 0
    end = time.perf_counter() + seconds

    async def client(i: int, c: httpx.AsyncClient) -> None:
        nonlocal tokens
        rng = random.Random(i)
        await asyncio.sleep(rng.uniform(0, 1))  # not all 200 on the same millisecond
        n = 0
        while time.perf_counter() < end:
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": i * 1000 + n, "stream": True,
                    "stream_options": {"include_usage": True}}
            n += 1
            kind, secs, retry, toks = await attempt(c, body)
            outcomes[kind] += 1
            if kind in lat:
                lat[kind].append(secs)
            tokens += toks
            if kind == "429":
                await asyncio.sleep(retry + rng.uniform(0, 0.5))  # honour Retry-After, with jitter
            elif kind != "completed":
                await asyncio.sleep(1)

    limits = httpx.Limits(max_connections=clients + 16, max_keepalive_connections=clients + 16)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout), limits=limits) as c:
        await asyncio.gather(*[client(i, c) for i in range(clients)])
    wall = time.perf_counter() - t0
    row = {"wall_s": round(wall, 1), "attempts": sum(outcomes.values()), "completed": outcomes["completed"],
           "rejected_429": outcomes["429"], **{f: outcomes[f] for f in FAILURES},
           "completed_per_s": round(outcomes["completed"] / wall, 2), "output_tokens_per_s": round(tokens / wall, 1)}
    for kind, xs in lat.items():
        for q in (0.5, 0.95, 0.99):
            row[f"{kind}_p{int(q * 100)}_ms"] = pct(xs, q)
    return row


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--client-timeout", type=float, default=90, help="a request without an answer by then is a hang")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load")
    return p.parse_args()


def run_rounds(a: argparse.Namespace, model: str) -> tuple[list[dict], list[float], bool, int]:
    """Serves the base on vLLM and runs the rounds: (rows, tree RSS before and after each round,
    whether the server still answered afterwards, error lines in its log)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"engine": "vllm", "adapters_root": f"{tmp}/adapters", "tasks": {}, "state_file": f"{tmp}/state.json",
               "max_model_len": 512, "kv_cache_gb": 1,
               "limits": {"max_concurrency": a.max_concurrency, "max_queue": a.max_queue,
                          "max_tokens_cap": a.max_tokens, "queue_timeout_s": 30}}
        t0 = time.time()
        with ServerProcess(cfg, Path(tmp) / "serve") as srv:
            print(f"bench: vllm ready in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            warm = asyncio.run(round_(srv.url, model, 4, 5, a.max_tokens, a.client_timeout))  # compile/warm paths
            print(f"bench: warm-up {warm['completed']} completed", file=sys.stderr, flush=True)
            time.sleep(2)
            rss = [tree_rss_mb(srv.proc.pid)]
            rows = []
            for i in range(a.rounds):
                row = {"round": i + 1, **asyncio.run(round_(srv.url, model, a.clients, a.seconds, a.max_tokens,
                                                             a.client_timeout))}
                time.sleep(2)  # let the last streams' buffers go
                rss.append(tree_rss_mb(srv.proc.pid))
                row["rss_after_mb"] = rss[-1]
                rows.append(row)
                print(f"bench: {row}", file=sys.stderr, flush=True)
            alive = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                               json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            log = srv.log()
    errors_in_log = sum(1 for line in log.splitlines() if "Traceback" in line or " ERROR " in line)
    return rows, rss, alive.status_code == 200, errors_in_log


def report(a: argparse.Namespace, rows: list[dict], rss: list[float], alive: bool, errors_in_log: int) -> int:
    """Writes bench/results/load.{json,md}; returns the number of failed attempts."""
    total = {k: sum(r[k] for r in rows) for k in ("attempts", "completed", "rejected_429", *FAILURES)}
    growth = round(rss[-1] / rss[1], 3)
    info = results_io.meta(model="SmolLM2-135M-Instruct fp32 (base)", engine="vllm", clients=a.clients,
                           seconds_per_round=a.seconds, rounds=a.rounds, max_tokens=a.max_tokens,
                           max_concurrency=a.max_concurrency, max_queue=a.max_queue,
                           client_timeout_s=a.client_timeout)
    payload = {"meta": info, "rows": rows, "totals": total, "rss_mb": {"before": rss[0], "after_rounds": rss[1:],
               "growth_last_over_first_round": growth}, "server_ok_after": alive,
               "server_log_errors": errors_in_log}
    lines = [f"Measured {info['date']} on {info['machine']}; {info['model']} on vLLM; {a.clients} streaming clients "
             f"for {a.seconds:g} s per round against max_concurrency {a.max_concurrency} + max_queue {a.max_queue}; "
             f"max_tokens {a.max_tokens}; a 429 is retried after its Retry-After (+0-0.5 s jitter); client timeout "
             f"{a.client_timeout:g} s.", ""]
    lines += results_io.table(
        ["round", "attempts", "completed", "429", "dropped", "hang", "5xx", "malformed", "completed/s", "tok/s",
         "completed p50/p95/p99 ms", "429 p50/p95/p99 ms", "tree RSS after MB"],
        [[r["round"], r["attempts"], r["completed"], r["rejected_429"], r["dropped"], r["hang"], r["5xx"],
          r["malformed"] + r["429_without_retry_after"] + r["other_status"], r["completed_per_s"],
          r["output_tokens_per_s"], f"{r['completed_p50_ms']} / {r['completed_p95_ms']} / {r['completed_p99_ms']}",
          f"{r['429_p50_ms']} / {r['429_p95_ms']} / {r['429_p99_ms']}", r["rss_after_mb"]] for r in rows])
    failures = sum(total[f] for f in FAILURES)
    lines += ["", f"Every attempt completed or got a 429 with Retry-After: {'yes' if failures == 0 else 'NO'} "
              f"({total['completed']} completed, {total['rejected_429']} 429s, {failures} failures). "
              f"Server tree RSS {rss[0]} MB before, {' / '.join(str(x) for x in rss[1:])} MB after each round; "
              f"growth last/first round {growth}x. Server answered afterwards: {alive}; "
              f"error lines in its log: {errors_in_log}."]
    results_io.write(a.out, payload, lines)
    return failures


def main() -> None:
    a = parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * a.clients + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # one socket per client, and then some
    if report(a, *run_rounds(a, model="base")):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
