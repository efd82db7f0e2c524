"""The memory estimator: arithmetic invariants, the CLI, and the cited 7B/70B figures.

No training here: bench/estimate_bench.py holds the estimate against measured peak RSS.
"""

from __future__ import annotations

import json

import pytest

from bench.estimate_bench import published_rows
from tests.conftest import run_cli
from training.estimate import PRESETS, EstimateConfig, estimate, resolve_shape
from training.estimate.memory import (
    gradients_bytes,
    layer_activation_bytes_per_token,
    model_states_bytes,
    nf4_bytes_per_param,
    optimizer_bytes,
    weights_bytes,
)

METHODS = ["full", "freeze", "lora", "qlora", "dora", "prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter"]
SMOL = PRESETS["smollm2-135m"]


def test_preset_parameter_counts_match_the_published_sizes():
    assert SMOL.total_params() == 134_515_008  # what transformers counts for the packaged SmolLM2
    assert round(PRESETS["llama-2-7b"].total_params() / 1e9, 2) == 6.74
    assert round(PRESETS["llama-2-70b"].total_params() / 1e9, 1) == 69.0
    assert round(PRESETS["qwen-7b"].total_params() / 1e9, 1) == 7.7


def test_the_packaged_model_config_reads_like_its_preset(base_dir):
    shape = resolve_shape(str(base_dir / "config.json"))
    assert shape.total_params() == SMOL.total_params()
    assert (shape.num_kv_heads, shape.tie_embeddings) == (3, True)


@pytest.mark.parametrize("method", METHODS)
def test_components_sum_to_the_total(method):
    for device in ("cpu", "cuda"):
        for gc in (True, False):
            cfg = EstimateConfig(model="llama-2-7b", method=method, device=device, gradient_checkpointing=gc)
            est = estimate(cfg)
            assert sum(est.parts().values()) == est.total
            assert all(v >= 0 for v in est.parts().values())
            assert est.weights > 0 and est.activations > 0 and est.runtime > 0


@pytest.mark.parametrize("method", METHODS)
def test_monotonic_in_sequence_length_and_batch(method):
    def total(**kw):
        return estimate(EstimateConfig(model="smollm2-135m", method=method, gradient_checkpointing=False, **kw)).total

    lengths = [total(batch_size=2, max_length=s) for s in (64, 128, 512, 2048)]
    batches = [total(batch_size=b, max_length=256) for b in (1, 2, 4, 16)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    assert batches == sorted(batches) and len(set(batches)) == 4


def test_zero_stages_divide_states_over_devices():
    shape = PRESETS["llama-2-7b"]

    def cfg(**kw):
        return EstimateConfig(model="llama-2-7b", method="full", precision="mixed", devices=8, **kw)

    plain, z1, z2, z3 = cfg(), cfg(zero_stage=1), cfg(zero_stage=2), cfg(zero_stage=3)
    assert optimizer_bytes(z1, shape)[0] == optimizer_bytes(plain, shape)[0] // 8
    assert gradients_bytes(z1, shape) == gradients_bytes(plain, shape)
    assert gradients_bytes(z2, shape) == gradients_bytes(plain, shape) // 8
    assert weights_bytes(z2, shape) == weights_bytes(plain, shape)
    # ZeRO-3 holds 1/8 of the weights plus the two layers it gathers for compute
    gathered = 2 * shape.layer_params() * 2
    assert weights_bytes(z3, shape)[0] == weights_bytes(plain, shape)[0] // 8 + gathered
    assert model_states_bytes(z3, shape) == pytest.approx(model_states_bytes(plain, shape) / 8, rel=1e-6)
    # more devices, less per device; FSDP full shard counts like ZeRO-3
    assert estimate(cfg(zero_stage=3)).total > estimate(EstimateConfig(
        model="llama-2-7b", method="full", precision="mixed", devices=64, zero_stage=3)).total
    assert estimate(EstimateConfig(model="llama-2-7b", method="full", precision="mixed", devices=8,
                                   fsdp=True)).total == estimate(z3).total
    # CPU offload moves optimizer states (and with `all`, the weights) off the device
    off = estimate(cfg(zero_stage=3, offload="all"))
    assert off.optimizer == 0 and off.weights == gathered and off.host_offload > 0


def test_qlora_weights_are_about_half_a_byte_per_quantized_parameter():
    shape = PRESETS["llama-2-7b"]
    assert nf4_bytes_per_param(True) == pytest.approx(0.5 + 1 / 64 + 4 / 16384)
    assert nf4_bytes_per_param(False) == pytest.approx(0.5625)
    cfg = EstimateConfig(model="llama-2-7b", method="qlora")
    linear = shape.num_layers * shape.layer_linear_params()
    rest = shape.total_params() - linear  # embeddings, head, norms stay fp32
    adapters = estimate(cfg).trainable_params * 4
    assert weights_bytes(cfg, shape)[0] == int(linear * nf4_bytes_per_param(True)) + rest * 4 + adapters
    assert 0.5 < (weights_bytes(cfg, shape)[0] - rest * 4 - adapters) / linear < 0.52
    lora = estimate(EstimateConfig(model="llama-2-7b", method="lora"))
    assert estimate(cfg).weights < lora.weights / 2.5


def test_lora_activations_match_torch_saved_tensors():
    # Bytes per token per layer counted with torch.autograd.graph.saved_tensors_hooks on a real
    # LlamaDecoderLayer of SmolLM2's shape in fp32 (see the estimator's docstring).
    def per_layer(**kw):
        return layer_activation_bytes_per_token(EstimateConfig(device="cpu", **kw), SMOL)

    assert per_layer(method="lora") == 69612
    assert per_layer(method="lora", dropout=0.0) == 40428
    assert per_layer(method="full") == 44588


def test_cli_prints_the_table_and_json():
    out = run_cli("-m", "guardtune.cli", "estimate", "examples/train_lora.yaml", "--device", "cpu", timeout=60)
    assert out.returncode == 0, out.stderr
    for word in ("weights", "gradients", "optimizer", "activations", "runtime", "total"):
        assert word in out.stdout
    assert "batch 4 x 256 tokens" in out.stdout  # read from the train config
    js = run_cli("-m", "guardtune.cli", "estimate", "--model", "llama-2-70b", "method=qlora", "zero_stage=3",
                 "devices=2", "--json", timeout=60)
    data = json.loads(js.stdout)
    assert data["model"]["num_layers"] == 80 and data["config"]["zero_stage"] == 3
    assert sum(data["bytes"][k] for k in ("weights", "gradients", "optimizer", "activations", "runtime")) \
        == data["bytes"]["total"]


def test_cli_says_when_host_memory_fast_can_exceed_the_total():
    args = ("-m", "guardtune.cli", "estimate", "examples/train_lora.yaml", "--device", "cpu")
    bounded, fast = run_cli(*args, "host_memory=bounded", timeout=60), run_cli(*args, "host_memory=fast", timeout=60)
    auto = run_cli(*args, timeout=60)
    assert bounded.returncode == 0 and fast.returncode == 0 and auto.returncode == 0, fast.stderr
    assert "host_memory fast" in fast.stdout and "note:" not in bounded.stdout
    assert "host_memory auto, train's default" in auto.stdout
    total = lambda out: next(line for line in out.splitlines() if line.startswith("total"))  # noqa: E731
    assert total(fast.stdout) == total(bounded.stdout)  # the same live tensors; only the note differs


@pytest.mark.parametrize("args, message", [
    (["examples/train_lora.yaml", "learnin_rate=1"], "unknown key 'learnin_rate' (did you mean 'learning_rate'?)"),
    (["--model", "no-such-model"], "model 'no-such-model': not a preset"),
    (["method=qlora", "quantization=none"], "qlora requires 4-bit quantization"),
    (["method=full", "offload=optimizer"], "offload needs a ZeRO stage"),
    (["--model-config", "missing.json"], "model config missing.json: no such file"),
    (["batch_size=0"], "'batch_size'"),
])
def test_cli_bad_config_is_one_line_and_exit_2(args, message):
    out = run_cli("-m", "guardtune.cli", "estimate", *args, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_model_config_without_weights(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from_file = estimate(EstimateConfig(model=str(tmp_path), method="lora"))
    preset = estimate(EstimateConfig(model="llama-2-7b", method="lora"))
    assert from_file.total == preset.total


def test_7b_and_70b_estimates_land_near_the_cited_figures():
    rows = published_rows()
    checked = [r for r in rows if r["tolerance"] is not None]
    assert len(checked) >= 12
    for r in checked:
        assert abs(r["ratio"] - 1) <= r["tolerance"], r
    # the 48 GB single-GPU claim for 65B QLoRA is an upper bound
    bound = next(r for r in rows if "48 GB GPU" in r["claim"])
    assert bound["ratio"] < 1


def test_every_problem_is_reported_at_once():
    from kernel.errors import GuardtuneError
    from training.estimate import load_estimate_config

    with pytest.raises(GuardtuneError) as err:
        load_estimate_config(None, ["method=qlora", "quantization=none", "offload=optimizer", "target_modules=[w1]"])
    lines = str(err.value).splitlines()
    assert lines[0] == "estimate: 3 problems"
    for expected, line in zip(("qlora requires 4-bit", "target module 'w1'", "offload needs a ZeRO stage"), lines[1:]):
        assert expected in line


def test_train_keys_are_accepted_and_the_memory_free_ones_ignored():
    from training.config import TrainConfig
    from training.estimate.options import IGNORED_TRAIN_KEYS, MAPPED_TRAIN_KEYS

    shared = set(TrainConfig.model_fields) - IGNORED_TRAIN_KEYS - MAPPED_TRAIN_KEYS
    assert shared <= set(EstimateConfig.model_fields)
    assert {"learning_rate", "task", "beta"} <= IGNORED_TRAIN_KEYS and {"rank", "batch_size"} <= shared
