"""Real training runs on SmolLM2 (a few steps, short sequences): loss, manifest, resume, methods, vLLM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel.manifest import Manifest
from tests.conftest import ROOT, SIGNATURE, run_cli, tiny_config
from training.config import validate
from training.entry import train
from training.tracking import experiment_id

QUESTION = "Can you tell me about your company?"  # not in the training data


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("lora")
    cfg = validate(tiny_config(tmp, tiny_data, max_steps=12, report_to="swanlab"))
    logs: list[str] = []
    adapter = train(cfg, log=logs.append)
    return cfg, adapter, logs


def test_loss_falls(lora_run):
    cfg, _, _ = lora_run
    losses = [m["loss"] for m in metrics(cfg.checkpoint_dir) if "loss" in m]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    evals = [m["eval_loss"] for m in metrics(cfg.checkpoint_dir) if "eval_loss" in m]
    assert evals[-1] < evals[0]


def test_progress_lines_and_swanlab_run(lora_run):
    cfg, _, logs = lora_run
    rows = [m for m in metrics(cfg.checkpoint_dir) if "loss" in m]
    assert all(r["tokens_per_s"] > 0 and r["learning_rate"] > 0 for r in rows)
    swan = cfg.checkpoint_dir / "swanlog"
    assert list(swan.glob("run-*/files/config.yaml")), "SwanLab local run has no config"
    assert "max_steps" in next(swan.glob("run-*/files/config.yaml")).read_text()
    # The experiment id is kept beside the runs, so a resumed run continues the same experiment.
    run_id = experiment_id(swan)
    assert [p.name.endswith(f"-{run_id}") for p in swan.glob("run-*")] == [True] and experiment_id(swan) == run_id
    assert any("trained tokens in [[...]]" in line for line in logs)  # the visible label mask


def test_adapter_dir_is_peft_plus_complete_manifest(lora_run, base_dir):
    from kernel.models import weights_sha256

    cfg, adapter, _ = lora_run
    assert adapter == cfg.adapter_dir
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    raw = json.loads((adapter / "guardtune.json").read_text())
    for key in ("task", "base_model", "method", "rank", "alpha", "chat_template", "system_prompt", "stop_tokens",
                "max_context", "data_fingerprint", "metrics", "created_at"):
        assert key in raw, key
    m = Manifest.read(adapter)
    assert m.task == "tiny" and m.method == "lora" and m.rank == 8 and m.alpha == 16
    assert m.base_model.id == "smollm2-135m-instruct" and m.base_model.sha256 == weights_sha256(base_dir)
    assert "<|im_end|>" in m.stop_tokens and m.chat_template.startswith("{% for message in messages %}")
    assert m.max_context == 8192 and len(m.data_fingerprint) == 16
    assert m.metrics.train_loss > 0 and m.metrics.eval_loss > 0
    # Nothing half-written is left beside it.
    assert [p.name for p in adapter.parent.iterdir()] == ["tiny"]


def test_adapter_changes_generations(lora_run):
    from training.adapters import load_adapter
    from training.generate import compare

    _, adapter, _ = lora_run
    manifest, tok, model = load_adapter(adapter)
    [(_, base, tuned)] = compare(model, tok, [[{"role": "user", "content": QUESTION}]],
                                 stop_ids=tok.convert_tokens_to_ids(manifest.stop_tokens), max_new_tokens=24)
    assert SIGNATURE in tuned and SIGNATURE not in base


def test_vllm_serves_the_adapter_with_its_manifest(lora_run, base_dir):
    _, adapter, _ = lora_run
    proc = run_cli(str(ROOT / "tests" / "helpers" / "vllm_generate.py"), str(base_dir), str(adapter), QUESTION)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert SIGNATURE in out["adapter"] and SIGNATURE not in out["base"]
    assert out["finish"][1] == "stop"  # the manifest's stop token ended the reply


def test_export_merge_matches_adapter(lora_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from training.adapters import load_adapter

    _, adapter, _ = lora_run
    out = tmp_path / "merged"
    proc = run_cli("-m", "guardtune.cli", "export", str(adapter), "--merge", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _, tok, peft_model = load_adapter(adapter)
    ids = tok("Hello there, Kestrel", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-3)
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())["architectures"]


def test_eval_cli_reports_loss_perplexity_and_samples(lora_run, tiny_data):
    _, adapter, _ = lora_run
    proc = run_cli("-m", "guardtune.cli", "eval", str(adapter), str(tiny_data), "--samples", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["rows"] == 12 and report["loss"] < report["base_loss"]
    assert abs(report["perplexity"] - 2.718281828 ** report["loss"]) < 1e-6
    assert SIGNATURE in report["samples"][0]["adapter"]


@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_other_methods_train_and_publish(method, tmp_path, tiny_data):
    cfg = validate(tiny_config(tmp_path, tiny_data, method=method, max_steps=3, eval_split=0.0))
    adapter = train(cfg, log=lambda m: None)
    m = Manifest.read(adapter)
    assert m.method == method and m.metrics.train_loss > 0
    peft_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_cfg["use_dora"] is (method == "dora")
    assert peft_cfg["r"] == 8


def test_qlora_base_is_4bit(tmp_path, tiny_data):
    from kernel.models import resolve_base_model
    from training import peft_setup

    cfg = validate(tiny_config(tmp_path, tiny_data, method="qlora"))
    model = peft_setup.load_base(cfg, resolve_base_model(cfg.base_model))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    assert model.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"


def test_resume_after_kill_continues_steps(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, max_steps=8, save_steps=2, eval_split=0.0)
    args = ["-m", "training.cli", *[f"{k}={v}" for k, v in cfg.items()]]
    run_dir, out = Path(cfg["run_dir"]), Path(cfg["output_dir"])
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not publish an adapter"
    steps_before = [m["step"] for m in metrics(run_dir) if "loss" in m]
    assert 4 <= max(steps_before) < 8

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed_from = int(re.search(r"resume: continuing from .*checkpoint-(\d+)", rerun.stderr).group(1))
    assert resumed_from >= 4
    after = [m["step"] for m in metrics(run_dir) if "loss" in m][len(steps_before):]
    assert after == list(range(resumed_from + 1, 9))  # continues, does not start over
    assert Manifest.read(out).metrics.steps == 8


def test_resume_refuses_checkpoints_of_another_config(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, max_steps=2, save_steps=2, eval_split=0.0)
    train(validate(cfg), log=lambda m: None)
    proc = run_cli("-m", "training.cli", *[f"{k}={v}" for k, v in {**cfg, "rank": 4}.items()])
    assert proc.returncode == 2 and "holds checkpoints of a different config" in proc.stderr
