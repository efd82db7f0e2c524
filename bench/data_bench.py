"""Tokenisation throughput and peak memory of `prepare` (streamed, sharded, cached) as data grows.

For each size the bench writes that many generated chats to a temp dir and runs `prepare` in its own
process (so peak RSS is its own, and its tokenising workers' apart), with a fresh cache. Peak RSS
should stay flat across sizes: the stream is never held whole and each shard of `shard_rows` rows is
written to disk before the next. Baselines in the same run: the smallest size's peak RSS, and the
per-row path that `prepare` used before the piecewise fast path (tokenize_conversation, which renders
every prefix of a chat, in a loop) for throughput. CPU time per row (the main process and its
workers together) is reported too: unlike rows/s it hardly moves when something else shares the
cores, and "other cores" (busy time in /proc/stat during the size, less the bench's own) says
whether something did.
Results: bench/results/data.{json,md}; docs/tokenisation.md explains the fast path.

    .venv/bin/python bench/data_bench.py [--sizes 10000 100000 1000000] [--shard-rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import results_io  # noqa: E402

CHILD = """
import json, resource, sys, time
import datasets  # start-up, not tokenising: `train` has it imported (with the Trainer) before prepare
from transformers import AutoTokenizer
from kernel.models import resolve_base_model
from training.config import validate
from training.data.dataset import prepare
from training.data.workers import cores
tok = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m-instruct"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = validate({"train_file": sys.argv[1], "eval_split": 0.0, "max_length": 512, "shard_rows": int(sys.argv[2])})
cpu = lambda: sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
t0, c0 = time.time(), cpu()
data = prepare(cfg, tok, log=lambda m: print(m, file=sys.stderr, flush=True))
dt = time.time() - t0
print("RESULT", json.dumps({"seconds": dt, "cpu_seconds": cpu() - c0, "rows": data.stats.train_rows,
      "tokens": data.stats.total_tokens, "shards": len(data.stats.shards["train"]), "rss_before_kb": before,
      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "packing": cfg.packing, "cores": cores(),
      "worker_peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), flush=True)
"""

BASELINE = """
import resource, sys, time
from transformers import AutoTokenizer
from kernel.models import resolve_base_model
from training.data.processor import MaskOptions, tokenize_conversation
from training.data.readers import read_jsonl
tok = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m-instruct"))
convs = read_jsonl(sys.argv[1]).conversations
t0 = time.time()
for c in convs:
    tokenize_conversation(tok, c, MaskOptions(max_length=512))
print("RESULT", len(convs) / (time.time() - t0), flush=True)
"""

WORDS = ("panel battery inverter roof survey quote warranty install charger meter solar winter summer price "
         "kilowatt hour saving finance loan weekend team visit day week month year our your the a is are can "
         "we you do does how what when where which will would should").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice(".?!")


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """Generated chats: 1-3 exchanges, replies of 8-60 words."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            msgs = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                msgs.append({"role": "user", "content": sentence(rng, rng.randint(4, 16))})
                msgs.append({"role": "assistant", "content": sentence(rng, rng.randint(8, 60))})
            fh.write(json.dumps({"messages": msgs}) + "\n")


def run(code: str, args: list[str], cache: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                               "GUARDTUNE_CACHE": str(cache)})
    if proc.returncode != 0:
        raise SystemExit(f"bench child failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.split("RESULT", 1)[1].strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--shard-rows", type=int, default=20_000)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data")
    a = p.parse_args()
    from kernel.paths import cache_root

    results, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in sorted(a.sizes):
            data = work / f"rows-{n}.jsonl"
            t0 = time.time()
            write_rows(data, n)
            cache = work / f"cache-{n}"
            cache.mkdir()
            (cache / "models").symlink_to(cache_root() / "models")  # the materialised base, not rebuilt
            print(f"bench: {n:,} rows ({data.stat().st_size / 1e6:.0f} MB, written in {time.time() - t0:.0f}s), "
                  "tokenising ...", file=sys.stderr, flush=True)
            if not results:  # throughput baseline: the previous per-row path, on the smallest size
                baseline_rows_s = float(run(BASELINE, [str(data)], cache))
            before = _cpu_snapshot()
            raw = json.loads(run(CHILD, [str(data), str(a.shard_rows)], cache))
            results.append(_row(n, raw, _other_cores(before), cache))
            print(f"bench: {results[-1]}", file=sys.stderr, flush=True)
            data.unlink()
    base = results[0]
    for r in results:
        r["peak_rss_vs_smallest"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
        r["rows_per_s_vs_per_row_path"] = round(r["rows_per_s"] / baseline_rows_s, 2)
    info = results_io.meta(config=f"SmolLM2 tokenizer, generated chats of 1-3 exchanges, max_length 512, "
                                  f"shard_rows {a.shard_rows}, packing {raw['packing']}, {raw['cores']} cores "
                                  "for tokenising workers", per_row_path_rows_per_s=round(baseline_rows_s))
    results_io.write(a.out, {"meta": info, "results": results}, _lines(info, results, baseline_rows_s))


def _cpu_snapshot() -> tuple[float, float | None, float]:
    """(wall time, busy CPU seconds of the whole machine or None off Linux, CPU seconds of our children)."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, IndexError, ValueError):
        busy = None
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time(), busy, ru.ru_utime + ru.ru_stime


def _other_cores(before: tuple[float, float | None, float]) -> float | None:
    """Cores that other processes kept busy since `before`, on average."""
    after = _cpu_snapshot()
    if before[1] is None or after[1] is None:
        return None
    return round(max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]), 2)


def _row(n: int, r: dict, other: float | None, cache: Path) -> dict:
    return {"rows": n, "shards": r["shards"], "tokens": r["tokens"], "seconds": round(r["seconds"], 1),
            "rows_per_s": round(n / r["seconds"]), "tokens_per_s": round(r["tokens"] / r["seconds"]),
            "cpu_us_per_row": round(r["cpu_seconds"] / n * 1e6, 1), "other_cores": other,
            "rss_after_load_mb": round(r["rss_before_kb"] / 1024), "peak_rss_mb": round(r["peak_rss_kb"] / 1024),
            "worker_peak_rss_mb": round(r["worker_peak_rss_kb"] / 1024),
            "cache_mb": round(sum(f.stat().st_size for f in cache.glob("datasets/*/*")) / 1e6)}


def _lines(info: dict, results: list[dict], baseline_rows_s: float) -> list[str]:
    base = results[0]
    lines = [f"Measured {info['date']} on {info['machine']}; {info['config']}. The previous per-row path "
             f"tokenised {round(baseline_rows_s):,} rows/s on {base['rows']:,} rows already in memory (no JSON "
             "reading, no cache writing), which the rows/s below include. CPU us/row: the main process and its "
             "workers together. Other cores: what other processes kept busy meanwhile, on average (near 0: the "
             "cores were the bench's).", ""]
    return lines + results_io.table(
        ["rows", "shards", "seconds", "rows/s", "x per-row path", "CPU us/row", "other cores", "tokens/s",
         "RSS after load MB", "peak RSS MB", "x smallest", "worker peak RSS MB", "cache MB"],
        [[f"{r['rows']:,}", r["shards"], r["seconds"], f"{r['rows_per_s']:,}", r["rows_per_s_vs_per_row_path"],
          r["cpu_us_per_row"], r["other_cores"], f"{r['tokens_per_s']:,}", r["rss_after_load_mb"],
          r["peak_rss_mb"], r["peak_rss_vs_smallest"], r["worker_peak_rss_mb"], r["cache_mb"]] for r in results])


if __name__ == "__main__":
    main()
