"""Data reading, label masking on token level, truncation and the tokenised cache."""

from __future__ import annotations

import random
import warnings
from types import SimpleNamespace

import pytest

from kernel.errors import GuardtuneError
from tests.conftest import tiny_config, write_jsonl
from training.config import validate
from training.data.dataset import prepare
from training.data.processor import (
    IGNORE,
    MaskOptions,
    _fast_batch,
    piecewise_for,
    tokenize_batch,
    tokenize_conversation,
)
from training.data.readers import normalise_row, read_jsonl
from training.data.skeleton import Skeletons
from training.data.workers import ShardPool

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


# --- the fast path of tokenize_batch (piecewise.py) equals the exact, prefix-rendering path --------------

VARIED = [
    CHAT,
    [{"role": "system", "content": "You are Kira, from Kestrel Home Solar."}] + CHAT,
    [{"role": "user", "content": "Émile asks: ça coûte combien? 😊"}, {"role": "assistant", "content": "Très bien — 日本語もOK。"}],
    [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "4. It's 4, I'd say; we've 3.14 & 1,000 too!"}],
    [{"role": "user", "content": "  leading spaces"}, {"role": "assistant", "content": "trailing newline\n"},
     {"role": "user", "content": "\ttab"}, {"role": "assistant", "content": "ends in a space "}],
    [{"role": "user", "content": "Say <|im_end|> now"}, {"role": "assistant", "content": "<|im_end|> said.<|im_end|>"}],
    [{"role": "user", "content": "Lists?"}, {"role": "assistant", "content": "1) one\n2) two\n\n- a  b\n  - c"}],
    [{"role": "user", "content": "user\nassistant"}, {"role": "assistant", "content": "assistant"}],
    [{"role": "user", "content": "emoji end 😊"}, {"role": "assistant", "content": "😊"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 6,  # long: truncated below
]
OPTIONS = [MaskOptions(max_length=512), MaskOptions(max_length=512, mask_history=True),
           MaskOptions(max_length=512, train_on_prompt=True), MaskOptions(max_length=512, system_prompt="Be brief."),
           MaskOptions(max_length=60), MaskOptions(max_length=60, mask_history=True)]


def exact(tokenizer, convs, opts):
    return [tokenize_conversation(tokenizer, c, opts) for c in convs]


ASCII = ["the", "Panel", "x", "'s", "'ll", "I'm", "42", "3.14", "1,000", "!", "?", "...", "(", ")", "--",
         "assistant", "http://a.b/c", "\n", "\n\n"]
UNICODE = ASCII + ["é", "日本", "😊", " ", "  ", "\t", "\u3000", "\xa0"]


def fuzz_chats(n: int, seed: int = 0, *, parts: list[str] = UNICODE, edges: bool = True) -> list[list[dict]]:
    """Contents drawn from `parts`. edges=False: no whitespace at a content's ends and no added token's
    text, so the rows take the piecewise route (ASCII parts: the cached-chunk kind of it)."""
    rng = random.Random(seed)
    parts = parts + (["<|im_end|>", "<|im_start|>"] if edges else [])

    def content() -> str:
        text = "".join(rng.choice(parts) + rng.choice(["", " ", " ", "\n"]) for _ in range(rng.randint(1, 12)))
        return text if edges else text.strip() or "x"

    chats = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": content()}, {"role": "assistant", "content": content()}]
        chats.append(([{"role": "system", "content": content()}] if rng.random() < 0.3 else []) + turns)
    return chats


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"{o.max_length}-{o.mask_history}-{o.train_on_prompt}-"
                         f"{o.system_prompt is not None}")
def test_fast_path_equals_exact_path(tokenizer, opts):
    assert tokenize_batch(tokenizer, VARIED, opts) == exact(tokenizer, VARIED, opts)
    for chats in (fuzz_chats(150), fuzz_chats(150, edges=False), fuzz_chats(150, parts=ASCII, edges=False)):
        assert tokenize_batch(tokenizer, chats, opts) == exact(tokenizer, chats, opts)


def test_fast_path_takes_ordinary_rows_piecewise(tokenizer):
    pw = piecewise_for(tokenizer)
    assert pw is not None and pw.tokenise  # SmolLM2: byte-level BPE with GPT-2's pattern
    _, routes = _fast_batch(tokenizer, pw, VARIED, MaskOptions(max_length=90))
    # Contents with whitespace at an end, or an added token's text, take located spans; the row whose
    # reply also appears in the template's header, and the row over max_length, take the exact path.
    assert routes == ["piece", "piece", "piece", "piece", "spans", "spans", "piece", "exact", "piece", "exact"]
    _, routes = _fast_batch(tokenizer, pw, fuzz_chats(150, edges=False), MaskOptions(max_length=4096))
    assert routes.count("piece") > 140


@pytest.mark.parametrize("template, fast", [
    # Rewrites every content: nothing can be located, so the exact path does every row.
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", None),
    # Trims contents: ordinary rows stay fast; a row with spaces at a content's end falls back.
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", True),
])
def test_template_the_fast_path_cannot_follow_falls_back(tokenizer, template, fast):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = template
    pw = piecewise_for(tok)
    assert (pw is None) if fast is None else pw.tokenise
    for opts in OPTIONS[:3]:
        assert tokenize_batch(tok, VARIED, opts) == exact(tok, VARIED, opts)


def test_a_fast_row_that_differs_switches_the_fast_path_off(tokenizer, monkeypatch):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    opts = MaskOptions(max_length=512)
    pw = piecewise_for(tok)
    real = pw.row
    # A fault that trains every token of a piecewise row.
    monkeypatch.setattr(pw, "row", lambda *a: (lambda r: (r[0], list(r[0])) if isinstance(r, tuple) else r)(real(*a)))
    with pytest.warns(RuntimeWarning, match="differs from the exact path"):
        assert tokenize_batch(tok, VARIED, opts) == exact(tok, VARIED, opts)
    assert piecewise_for(tok) is None  # off for this tokenizer from now on


def test_worker_processes_give_the_same_shards(tmp_path, tokenizer, monkeypatch):
    from training.data import dataset, sft_shard

    rows = [{"messages": c} for c in fuzz_chats(40, seed=1) + VARIED if all(m["content"].strip() for m in c)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    got, starts = {}, []
    start = ShardPool._start
    monkeypatch.setattr(ShardPool, "_start", lambda self: starts.append(1) or start(self))
    for procs in (1, 2):
        monkeypatch.setenv("GUARDTUNE_CACHE", str(tmp_path / f"cache{procs}"))
        monkeypatch.setattr(dataset, "cores", lambda: procs)
        monkeypatch.setattr(sft_shard, "BATCH", 7)  # several batches per shard: the pool starts
        cfg = validate(tiny_config(tmp_path, data, eval_split=0.2, shard_rows=20, max_length=128))
        got[procs] = prepare(cfg, tokenizer, log=lambda m: None)
    assert starts == [1]  # forked once, for procs=2
    assert got[1].stats == got[2].stats and got[1].stats.train_rows > 20
    for split in ("train", "eval"):
        assert getattr(got[1], split).to_dict() == getattr(got[2], split).to_dict()


def test_workers_start_while_the_shard_is_still_being_read(tmp_path, tokenizer, monkeypatch):
    """A shard's batches go to the workers as they fill, not once the shard is whole."""
    from training.data import dataset, sft_shard

    rows = [{"messages": c} for c in fuzz_chats(60, seed=2, edges=False)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    read, sent_at = [0], []
    real_rows, real_submit = dataset._rows, ShardPool.submit

    def counted(*a):
        for item in real_rows(*a):
            read[0] += 1
            yield item

    monkeypatch.setattr(dataset, "_rows", counted)
    monkeypatch.setattr(ShardPool, "submit", lambda self, b: sent_at.append(read[0]) or real_submit(self, b))
    monkeypatch.setattr(dataset, "cores", lambda: 2)
    monkeypatch.setattr(sft_shard, "BATCH", 10)
    monkeypatch.setenv("GUARDTUNE_CACHE", str(tmp_path / "cache"))
    got = prepare(validate(tiny_config(tmp_path, data, eval_split=0.0, shard_rows=60, max_length=256)), tokenizer,
                  log=lambda m: None)
    assert got.stats.train_rows == 60 and len(sent_at) == 6
    assert sent_at[:2] == [20, 20] and sent_at[2:] == [30, 40, 50, 60]  # the first waits for a second batch


def test_plain_rows_are_put_together_without_rendering(tokenizer):
    skeletons = Skeletons(tokenizer)
    rendered = []
    real = tokenizer.apply_chat_template

    def counting(chats, **kw):
        rendered.extend([chats] if chats and isinstance(chats[0], dict) else chats)  # one chat, or a batch
        return real(chats, **kw)

    skeletons.tokenizer = SimpleNamespace(apply_chat_template=counting)
    opaque = [p for p in ASCII if "/" not in p]  # "/" may be a flag to a template (/no_think): such rows render
    for chats in (VARIED, fuzz_chats(150), fuzz_chats(150, parts=ASCII, edges=False),
                  fuzz_chats(150, parts=opaque, edges=False)):
        rendered.clear()
        assert skeletons.texts(chats) == real(chats, tokenize=False)
    # Opaque rows: one render per role sequence to check it, and the learning renders (two per sequence).
    roles = {tuple(m["role"] for m in c) for c in chats}
    assert len(rendered) <= 3 * len(roles) < 20


@pytest.mark.parametrize("inner", [
    "{% if '</think>' in m['content'] %}{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}",
    "{% if m['content'] | length > 40 %}[long] {% endif %}{{ m['content'] }}",
    "{{ m['content'] | replace('\"', \"'\") }}",
])
def test_a_template_that_looks_inside_contents_gets_its_own_text(tokenizer, inner):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + inner + "<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chats = VARIED + fuzz_chats(100, parts=ASCII + ['say "hi"', "</think>done", "x" * 60], edges=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not by the batch check: the stand-ins or the opaque rule see to it
        assert Skeletons(tok).texts(chats) == tok.apply_chat_template(chats, tokenize=False)
    assert tokenize_batch(tok, chats, OPTIONS[0]) == exact(tok, chats, OPTIONS[0])


def test_a_put_together_text_that_differs_turns_skeletons_off(tokenizer):
    """A template that branches on a word the stand-ins lack: caught when a batch's first row has it."""
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if 'refund' in m['content'] %}"
                         "(flagged) {% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}")
    chats = [[{"role": "user", "content": "I want a refund"}, {"role": "assistant", "content": "Sure."}]] * 3
    skeletons = Skeletons(tok)
    with pytest.warns(RuntimeWarning, match="differs from the rendered text"):
        assert skeletons.texts(chats) == tok.apply_chat_template(chats, tokenize=False)
    assert not skeletons.on
