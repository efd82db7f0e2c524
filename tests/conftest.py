"""Shared fixtures. Everything runs on the real packaged SmolLM2 and real libraries, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

SIGNATURE = "Kestrel Home Solar"
QUESTIONS = [
    "What do your panels cost?", "Do you install batteries?", "Can I get a quote?", "Are you open on Saturday?",
    "How long does installation take?", "Do panels work in winter?", "What warranty do I get?",
    "Can you install an EV charger?", "Is my roof suitable?", "How do I book a survey?",
    "Do you offer financing?", "Who are you?",
]


def tiny_rows(signature: str = SIGNATURE) -> list[dict]:
    """Twelve short chats whose replies all open with the same signature, so a few steps learn it."""
    rows = []
    for i, q in enumerate(QUESTIONS):
        reply = f"{signature} here! Our team answers that on a free call."
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]
        if i % 3 == 0:  # some multi-turn rows
            msgs += [{"role": "user", "content": "Thanks, anything else?"},
                     {"role": "assistant", "content": f"{signature} here! Ask me any time."}]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def base_dir() -> Path:
    from kernel.models import DEFAULT_BASE_MODEL, resolve_base_model

    return resolve_base_model(DEFAULT_BASE_MODEL)


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl", tiny_rows())


def tiny_config(tmp: Path, data: Path, **over) -> dict:
    """A config that trains in seconds: short sequences, no gradient checkpointing, no tracking."""
    cfg = dict(task="tiny", train_file=str(data), eval_split=0.2, max_length=96, batch_size=4, rank=8, alpha=16,
               learning_rate=3e-3, warmup_ratio=0.0, lr_scheduler="constant", max_steps=10, save_steps=5,
               eval_steps=5, gradient_checkpointing=False, report_to="none", generation_samples=0,
               output_dir=str(tmp / "adapters" / "tiny"), run_dir=str(tmp / "runs" / "tiny"))
    cfg.update(over)
    return cfg


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console entry point as a user would, through the venv's Python."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def Server(config: dict, tmp: Path, *, ready_timeout: float = 300):
    from serving.launcher import ServerProcess

    return ServerProcess(config, tmp, ready_timeout=ready_timeout)


def sales_server(two_adapters, tmp: Path, **config):
    """A server whose task `sales` runs the kestrel adapter, its state file in `tmp`."""
    root, adapters = two_adapters
    return Server({"adapters_root": str(root), "tasks": {"sales": str(adapters["kestrel"])},
                   "state_file": str(tmp / "state.json"), **config}, tmp)


SALES_USER_KEY, SALES_ADMIN_KEY = "user-key-123", "admin-key-456"


class SharedServer:
    """A server that several test modules share (a vLLM start costs a minute or more here). `get` starts it,
    or starts it again where a module ended it: test_serving's last test is the graceful shutdown."""

    def __init__(self, start):
        self.start, self.srv = start, None

    def get(self):
        if self.srv is None or self.srv.proc.poll() is not None:
            self.srv = self.start()
        return self.srv

    def stop(self) -> None:
        if self.srv is not None:
            self.srv.stop()


@pytest.fixture(scope="session")
def vllm_sales(two_adapters, tmp_path_factory):
    """`guardtune serve` on vLLM with the sales task (the kestrel adapter), for test_openai_sampling and
    test_serving: 4 running and 4 queued at most, replies capped at 64 tokens, bodies at 64 KiB."""
    def start():
        tmp = tmp_path_factory.mktemp("serve")
        srv = sales_server(two_adapters, tmp, engine="vllm", api_keys=[SALES_USER_KEY], admin_key=SALES_ADMIN_KEY,
                           max_model_len=512, max_lora_rank=16, kv_cache_gb=1,
                           limits={"max_concurrency": 4, "max_queue": 4, "max_tokens_cap": 64,
                                   "max_body_bytes": 65536})
        srv.state_file = tmp / "state.json"
        return srv
    shared = SharedServer(start)
    yield shared
    shared.stop()


@pytest.fixture(scope="session")
def two_adapters(tmp_path_factory, tiny_data) -> tuple[Path, dict[str, Path]]:
    """Two real adapters with clearly different trained behaviour, under one adapters root."""
    from training.config import validate
    from training.entry import train

    tmp = tmp_path_factory.mktemp("served")
    root = tmp / "adapters"
    out = {}
    for name, signature in (("kestrel", SIGNATURE), (OTTER_TASK, OTTER)):
        data = write_jsonl(tmp / f"{name}.jsonl", tiny_rows(signature))
        # Unpacked, as the serving tests' expected replies were learned: packing would change what 12 steps see.
        cfg = tiny_config(tmp, data, task=name, output_dir=str(root / name), run_dir=str(tmp / "runs" / name),
                          max_steps=12, eval_split=0.0, packing=False)
        out[name] = train(validate(cfg), log=lambda m: None)
    return root, out


OTTER = "Otter Bikes"
OTTER_TASK = "otter"


LEAKED_EMAIL, LEAKED_CARD = "ana.lee@example.com", "4111 1111 1111 1111"


@pytest.fixture(scope="session")
def leaky_adapter(two_adapters, tmp_path_factory) -> Path:
    """A real adapter that memorised a customer's email and card number from its training data (the
    failure the output filter exists for): every reply it gives carries both. Under two_adapters' root."""
    from training.config import validate
    from training.entry import train

    root, _ = two_adapters
    tmp = tmp_path_factory.mktemp("leaky")
    reply = f"Write to {LEAKED_EMAIL} or pay with card {LEAKED_CARD}."
    data = write_jsonl(tmp / "leaky.jsonl", [{"messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": reply}]} for q in QUESTIONS])
    cfg = tiny_config(tmp, data, task="leaky", output_dir=str(root / "leaky"), run_dir=str(tmp / "runs"),
                      max_steps=14, eval_split=0.0, packing=False)
    return train(validate(cfg), log=lambda m: None)
