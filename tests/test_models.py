"""Base model resolution: the packaged GGUF becomes a standard HF directory; bad bases fail clearly."""

from __future__ import annotations

import json

import pytest

from kernel.errors import GuardtuneError
from kernel.models import resolve_base_model, weights_sha256
from tests.conftest import run_cli


def test_materialised_dir_is_a_standard_hf_model(base_dir, tokenizer):
    config = json.loads((base_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert any(base_dir.glob("*.safetensors"))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = json.loads((base_dir / "generation_config.json").read_text())["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert "<|im_start|>" in tokenizer.chat_template


def test_materialised_model_generates_and_stops_at_end_of_turn(base_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(new)
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stopped by generation_config, not length


def test_second_resolution_reuses_the_cache(base_dir):
    assert resolve_base_model("smollm2-135m-instruct") == base_dir
    assert len(weights_sha256(base_dir)) == 64


def test_local_dir_missing_weights_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GuardtuneError) as err:
        resolve_base_model(str(tmp_path))
    assert "missing weights (*.safetensors), tokenizer (tokenizer.json)" in str(err.value)


def test_corrupt_config_is_reported(tmp_path, base_dir):
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(base_dir / name)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GuardtuneError, match="corrupt config.json"):
        resolve_base_model(str(tmp_path))


def test_missing_dir_and_offline_hub_id_fail_in_one_line(tmp_path):
    with pytest.raises(GuardtuneError, match="no such directory"):
        resolve_base_model(str(tmp_path / "absent"))
    proc = run_cli("-m", "guardtune.cli", "base", "someone/no-such-model", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: base model 'someone/no-such-model': could not fetch")
