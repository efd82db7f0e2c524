"""The train config: validators turn mistakes into one-line errors; the CLI exits non-zero."""

from __future__ import annotations

import pytest

from kernel.errors import GuardtuneError
from tests.conftest import run_cli
from training.config import load_config, parse_overrides, validate


def test_overrides_are_typed():
    assert parse_overrides(["max_steps=20", "method=qlora", "learning_rate=1e-4", "merge=false"]) == {
        "max_steps": 20, "method": "qlora", "learning_rate": 1e-4, "merge": False}


def test_unknown_key_names_the_closest_key():
    with pytest.raises(GuardtuneError, match=r"unknown key 'learnin_rate' \(did you mean 'learning_rate'\?\)"):
        validate({"train_file": "x.jsonl", "learnin_rate": 1e-4})


def test_qlora_requires_4bit():
    with pytest.raises(GuardtuneError, match="qlora requires 4-bit"):
        validate({"train_file": "x.jsonl", "method": "qlora", "quantization": "none"})
    assert validate({"train_file": "x.jsonl", "method": "qlora"}).quantized


def test_nf4_only_with_qlora():
    with pytest.raises(GuardtuneError, match="nf4 is only used with method qlora"):
        validate({"train_file": "x.jsonl", "method": "lora", "quantization": "nf4"})


def test_merge_refused_on_quantized_base():
    with pytest.raises(GuardtuneError, match="merge is refused on a quantized base"):
        validate({"train_file": "x.jsonl", "method": "qlora", "merge": True})


def test_bad_values_say_which_key():
    with pytest.raises(GuardtuneError, match="'rank'"):
        validate({"train_file": "x.jsonl", "rank": 0})
    with pytest.raises(GuardtuneError, match="'method'"):
        validate({"train_file": "x.jsonl", "method": "lorax"})
    with pytest.raises(GuardtuneError, match="give exactly one of train_file or datasets"):
        validate({})


def test_paths_in_file_are_relative_to_it_and_overrides_win(tmp_path):
    cfg_file = tmp_path / "conf" / "c.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text("train_file: data/t.jsonl\ntask: sales\n")
    cfg = load_config(cfg_file, ["max_steps=3"])
    assert cfg.train_file == tmp_path / "conf" / "data" / "t.jsonl"
    assert cfg.max_steps == 3 and cfg.task == "sales"
    assert str(cfg.adapter_dir) == "adapters/sales" and str(cfg.checkpoint_dir) == "runs/sales"


def test_fingerprint_ignores_run_length_but_not_method():
    a = validate({"train_file": "x.jsonl"})
    assert a.fingerprint() == validate({"train_file": "x.jsonl", "max_steps": 99}).fingerprint()
    assert a.fingerprint() != validate({"train_file": "x.jsonl", "method": "dora"}).fingerprint()


@pytest.mark.parametrize("content, expected", [
    ("train_file: x.jsonl\nbogus: 1\n", "unknown key 'bogus'"),
    ("train_file: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_cli_bad_config_is_one_line_and_exit_2(tmp_path, content, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    proc = run_cli("-m", "training.cli", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def test_cli_missing_config_file(tmp_path):
    proc = run_cli("-m", "training.cli", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_cli_missing_data_file(tmp_path):
    proc = run_cli("-m", "training.cli", f"train_file={tmp_path / 'none.jsonl'}", "report_to=none")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: data {tmp_path / 'none.jsonl'}: no such file"


def test_every_broken_rule_is_reported_at_once_one_line_each():
    with pytest.raises(GuardtuneError) as err:
        validate({"train_file": "x.jsonl", "method": "qlora", "quantization": "none", "packing": True,
                  "stage": "pt", "trainable_layers": 2, "deepspeed": "zero9"})
    lines = str(err.value).splitlines()
    assert lines[0] == "config: 4 problems"
    problems = [line.strip() for line in lines[1:]]
    assert len(problems) == 4 and all(line.startswith("  ") for line in lines[1:])
    for expected in ("packing only applies to stage sft", "qlora requires 4-bit quantization",
                     "deepspeed 'zero9': use one of", "trainable_layers only applies to method freeze, not qlora"):
        assert any(expected in p for p in problems), (expected, problems)


def test_every_bad_value_and_unknown_key_is_reported_at_once():
    with pytest.raises(GuardtuneError) as err:
        validate({"train_file": "x.jsonl", "rank": 0, "learnin_rate": 1e-4, "stage": "rl"})
    problems = str(err.value).splitlines()[1:]
    assert str(err.value).startswith("config: 3 problems")
    assert any("'rank'" in p for p in problems) and any("'stage'" in p for p in problems)
    assert any("did you mean 'learning_rate'" in p for p in problems)


def test_cli_prints_every_problem_and_exits_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train_file: x.jsonl\nmethod: lora\nquantization: nf4\nmask_history: true\ntrain_on_prompt: true\n")
    proc = run_cli("-m", "training.cli", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    at = lines.index(f"error: {cfg}: 2 problems")  # after any import-time warnings of the training stack
    problems = lines[at + 1:]
    assert len(problems) == 2, proc.stderr
    assert any("nf4 is only used with method qlora" in p for p in problems)
    assert any("mask_history and train_on_prompt exclude each other" in p for p in problems)


def test_serve_config_reports_every_problem():
    from serving.config import load_serve_config

    with pytest.raises(GuardtuneError) as err:
        load_serve_config(None, port=0, max_loras=0, enigne="vllm")
    lines = str(err.value).splitlines()
    assert lines[0] == "serve config (defaults): 3 problems"
    assert any("'port'" in line for line in lines) and any("'max_loras'" in line for line in lines)
    assert any("unknown key 'enigne' (did you mean 'engine'?)" in line for line in lines)
