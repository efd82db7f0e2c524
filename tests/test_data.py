"""Data reading, label masking on token level, truncation and the tokenised cache."""

from __future__ import annotations

import pytest

from kernel.errors import GuardtuneError
from tests.conftest import tiny_config, write_jsonl
from training.config import validate
from training.data.dataset import prepare
from training.data.processor import IGNORE, MaskOptions, tokenize_conversation
from training.data.readers import normalise_row, read_jsonl

CHAT = [
    {"role": "user", "content": "Hi, do you sell batteries?"},
    {"role": "assistant", "content": "Yes, the Vault 10 battery."},
    {"role": "user", "content": "Price?"},
    {"role": "assistant", "content": "It is 6,900 dollars installed."},
]


def trained_segments(tokenizer, ex) -> list[str]:
    """Decode each contiguous run of trained tokens."""
    segs, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            assert lab == tid  # labels are the token itself; the model shifts internally
            cur.append(tid)
        elif cur:
            segs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        segs.append(tokenizer.decode(cur))
    return segs


def test_alpaca_row_becomes_a_chat():
    msgs = normalise_row({"instruction": "Summarise", "input": "Panels are good.", "output": "Good panels."})
    assert msgs == [{"role": "user", "content": "Summarise\n\nPanels are good."},
                    {"role": "assistant", "content": "Good panels."}]


def test_multi_turn_mask_covers_each_reply_and_its_end_of_turn(tokenizer):
    ex = tokenize_conversation(tokenizer, CHAT, MaskOptions(max_length=512))
    assert trained_segments(tokenizer, ex) == ["Yes, the Vault 10 battery.<|im_end|>",
                                               "It is 6,900 dollars installed.<|im_end|>"]
    # Everything else, the template's default system prompt included, is masked.
    text = tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\n") and "SmolLM" in text
    assert tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE]).count("<|im_start|>") == 5


def test_mask_history_trains_only_last_reply(tokenizer):
    ex = tokenize_conversation(tokenizer, CHAT, MaskOptions(max_length=512, mask_history=True))
    assert trained_segments(tokenizer, ex) == ["It is 6,900 dollars installed.<|im_end|>"]


def test_train_on_prompt_trains_every_token(tokenizer):
    ex = tokenize_conversation(tokenizer, CHAT, MaskOptions(max_length=512, train_on_prompt=True))
    assert ex.labels == ex.input_ids


def test_configured_system_prompt_replaces_template_default(tokenizer):
    ex = tokenize_conversation(tokenizer, CHAT, MaskOptions(max_length=512, system_prompt="You are Kira."))
    text = tokenizer.decode(ex.input_ids)
    assert "You are Kira." in text and "SmolLM" not in text


def test_left_truncation_drops_oldest_whole_turns(tokenizer):
    full = tokenize_conversation(tokenizer, CHAT, MaskOptions(max_length=512))
    ex = tokenize_conversation(tokenizer, CHAT, MaskOptions(max_length=len(full.input_ids) - 1))
    assert ex.dropped_turns == 1
    text = tokenizer.decode(ex.input_ids)
    assert "batteries" not in text and "Price?" in text and text.startswith("<|im_start|>system")
    assert trained_segments(tokenizer, ex) == ["It is 6,900 dollars installed.<|im_end|>"]


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}', "unknown role 'bot'"),
    ('{"messages": [', "invalid JSON"),
    ("", "empty line"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "must end with an assistant turn"),
    ('{"instruction": "", "output": "x"}', "non-empty 'instruction'"),
    ('{"text": "raw"}', "neither 'messages' nor"),
])
def test_bad_row_names_file_and_line(tmp_path, line, reason):
    good = '{"instruction": "Hi", "output": "Hello"}'
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(GuardtuneError, match=rf"{path}:2: .*{reason}"):
        read_jsonl(path)
    res = read_jsonl(path, skip_bad_rows=True)
    assert len(res.conversations) == 2 and len(res.bad_rows) == 1 and res.bad_rows[0].startswith(f"{path}:2:")


def test_not_utf8_is_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"instruction": "caf\xe9", "output": "ok"}\n'.encode("latin-1"))
    with pytest.raises(GuardtuneError, match="not UTF-8"):
        read_jsonl(path)


def test_all_masked_dataset_is_an_error(tmp_path, tokenizer, monkeypatch):
    # A template that never renders assistant turns leaves nothing to train on.
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    monkeypatch.setenv("GUARDTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 3)
    with pytest.raises(GuardtuneError, match="every label is masked"):
        prepare(validate(tiny_config(tmp_path, data)), tok, log=lambda m: None)


def test_tokenised_dataset_is_cached(tmp_path, tokenizer, tiny_data, monkeypatch):
    monkeypatch.setenv("GUARDTUNE_CACHE", str(tmp_path / "cache"))
    cfg = validate(tiny_config(tmp_path, tiny_data))
    first = prepare(cfg, tokenizer, log=lambda m: None)
    second = prepare(cfg, tokenizer, log=lambda m: None)
    assert not first.cache_hit and second.cache_hit
    assert first.train["input_ids"] == second.train["input_ids"] and first.fingerprint == second.fingerprint
    assert first.stats.train_rows + first.stats.eval_rows == 12 and first.stats.eval_rows == 2
    third = prepare(validate(tiny_config(tmp_path, tiny_data, max_length=64)), tokenizer, log=lambda m: None)
    assert not third.cache_hit  # a setting that changes tokens changes the key


def test_shipped_examples_are_clean_and_config_validates():
    from tests.conftest import ROOT
    from training.config import load_config

    for name, n in (("sales_chat.jsonl", 300), ("sales_chat_alpaca.jsonl", 60), ("sales_chat_eval.jsonl", 30)):
        res = read_jsonl(ROOT / "examples" / "data" / name)
        assert len(res.conversations) == n and not res.bad_rows
    cfg = load_config(ROOT / "examples" / "train_lora.yaml", ["method=qlora", "max_steps=20"])
    assert cfg.train_file.is_file() and cfg.quantized and cfg.task == "sales"
