"""Data stages on the real SmolLM2 tokenizer and model: pt blocks, SFT packing and its attention
isolation, cleaning counts, and the streamed, sharded, cached tokenisation."""

from __future__ import annotations

import json
import threading
from functools import partial

import pytest
import torch

from tests.conftest import tiny_config, tiny_rows, write_jsonl
from training.config import validate
from training.data import shards
from training.data.cleaning import Cleaner
from training.data.dataset import prepare
from training.data.packing import PackedCollator, pack
from training.data.processor import IGNORE, MaskOptions, tokenize_conversation
from training.data.readers import read_jsonl
from training.data.sft_shard import SftShard

QUIET = dict(log=lambda m: None)

# Our own text for continued pretraining: a fictional product line, regular enough to learn in a few steps.
PRODUCTS = ["Vault 10 battery", "Sunroof 400 panel", "Harbor inverter", "Kite EV charger", "Beacon meter"]
DOCS = [f"The {p} is made by Kestrel Home Solar. It carries a ten year warranty and is installed by our own "
        f"team in {d} days. Ask Kestrel Home Solar about the {p} today."
        for d in ("two", "three", "four", "five") for p in PRODUCTS]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch, base_dir):
    """A fresh tokenised-data cache per test; the materialised model is shared, not rebuilt."""
    from kernel.paths import cache_root

    models = cache_root() / "models"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(models)
    monkeypatch.setenv("GUARDTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def rows_of(ds) -> list[tuple[list[int], list[int]]]:
    return [(list(r["input_ids"]), list(r["labels"])) for r in ds]


# --- stage pt ---------------------------------------------------------------------------------------

def test_pt_blocks_are_full_and_eos_separated(tmp_path, tokenizer):
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(DOCS) + "\n")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    got = {}
    for path in (txt, jsonl):  # a blank-line block of .txt and a JSONL `text` row are the same document
        data = prepare(validate(tiny_config(tmp_path, path, stage="pt", block_size=64, eval_split=0.0)),
                       tokenizer, **QUIET)
        got[path.suffix] = rows_of(data.train)
    assert got[".txt"] == got[".jsonl"]
    blocks = got[".txt"]
    assert all(len(ids) == 64 and labels == ids for ids, labels in blocks)  # full, and every token trained
    stream = [t for ids, _ in blocks for t in ids]
    eos = tokenizer.eos_token_id
    expected = [t for d in DOCS for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 64  # only the tail is dropped
    assert data.stats.dropped_tokens == len(expected) - len(stream) and data.stats.train_rows == len(DOCS)
    assert tokenizer.decode(stream).split(tokenizer.eos_token)[1] == DOCS[1]


def test_pt_stage_trains_and_loss_falls(tmp_path, tokenizer):
    from training.entry import train

    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(DOCS * 3) + "\n")
    cfg = validate(tiny_config(tmp_path, txt, stage="pt", block_size=48, max_steps=5, save_steps=5, eval_split=0.0))
    out = train(cfg, **QUIET)
    losses = [r["loss"] for r in map(json.loads, (cfg.checkpoint_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 5 and losses[-1] < 0.6 * losses[0], losses  # measured 4.9 -> 1.3
    manifest = json.loads((out / "guardtune.json").read_text())
    assert manifest["chat_template"] == tokenizer.chat_template and manifest["train_config"]["stage"] == "pt"


# --- sft packing --------------------------------------------------------------------------------------

def mixed_chats(n: int = 14) -> list[list[dict]]:
    chats = []
    for i in range(n):
        reply = "Kestrel Home Solar here. " + " ".join(["We install panels and batteries."] * (1 + (i * 5) % 9))
        chats.append([{"role": "user", "content": f"Question {i}: what do you offer?"},
                      {"role": "assistant", "content": reply}])
    return chats


def segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """Split a packed row at its position-id resets."""
    out = []
    for tid, lab, pos in zip(row["input_ids"], row["labels"], row["position_ids"]):
        if pos == 0:
            out.append(([], []))
        out[-1][0].append(int(tid))
        out[-1][1].append(int(lab))
    return out


def test_packing_keeps_every_label_mask(tokenizer):
    opts = MaskOptions(max_length=256)
    examples = [tokenize_conversation(tokenizer, c, opts) for c in mixed_chats()]
    packed = pack(examples, 256)
    rows = [dict(zip(packed, vals)) for vals in zip(*packed.values())]
    assert len(rows) < len(examples) and all(len(r["input_ids"]) <= 256 for r in rows)
    found = sorted((s for r in rows for s in segments(r)), key=lambda s: s[0])
    want = sorted(((e.input_ids, e.labels) for e in examples), key=lambda s: s[0])
    assert [ids for ids, _ in found] == [ids for ids, _ in want]  # every conversation exactly once, whole
    for (_, got), (_, labels) in zip(found, want):
        # The first label is never a target (no token precedes it), so packing masks it; every target
        # the conversation has alone, it has packed, and no other.
        assert got[0] == IGNORE and got[1:] == labels[1:]


def test_packed_conversations_do_not_attend_to_each_other(model, tokenizer):
    opts = MaskOptions(max_length=512)
    a, b, c = (tokenize_conversation(tokenizer, x, opts) for x in mixed_chats(3))
    alone = {k: model(input_ids=torch.tensor([e.input_ids])).logits[0] for k, e in (("a", a), ("b", b), ("c", c))}
    # Two packed rows of different lengths, so the second is padded: [a b] and [c + padding].
    packed = pack([a, b, c], len(a.input_ids) + len(b.input_ids))
    features = [dict(zip(packed, vals)) for vals in zip(*packed.values())]
    batch = PackedCollator(tokenizer.pad_token_id)(features)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        logits = model(**batch).logits
    for r, row in enumerate(features):
        start = 0
        for ids, _ in segments(row):
            name = next(k for k, e in (("a", a), ("b", b), ("c", c)) if e.input_ids == ids)
            torch.testing.assert_close(logits[r, start:start + len(ids)], alone[name], atol=1e-4, rtol=1e-4)
            start += len(ids)
    # The condition matters: with a KV cache, transformers skips the packed-sequence mask and the
    # second conversation of a row sees the first.
    ab = next(r for r, row in enumerate(features) if len(segments(row)) == 2)
    (first, _), (second, _) = segments(features[ab])
    with torch.no_grad():
        leaky = model(**{**batch, "use_cache": True}).logits[ab, len(first):len(first) + len(second)]
    second_alone = next(alone[k] for k, e in (("a", a), ("b", b), ("c", c)) if e.input_ids == second)
    assert (leaky - second_alone).abs().max() > 1e-2


def test_packing_trains(tmp_path, tokenizer):
    from training.entry import train

    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in mixed_chats(16)])
    cfg = validate(tiny_config(tmp_path, data, packing=True, max_length=256, max_steps=2, save_steps=2,
                               eval_split=0.0, batch_size=2))
    prepared = prepare(cfg, tokenizer, **QUIET)
    assert prepared.stats.train_rows == 16 and prepared.stats.train_sequences < 16
    train(cfg, **QUIET)
    losses = [r["loss"] for r in map(json.loads, (cfg.checkpoint_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)


# --- cleaning -----------------------------------------------------------------------------------------

def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


LONG = ("Our Sunroof 400 panels come with a ten year warranty, a free roof survey and installation by our own "
        "team within three weeks of the order, weather permitting.")


def test_cleaning_options_count_what_they_touch(tmp_path, tokenizer):
    rows = [
        chat("Um, how much is a battery?", "The Vault 10 is 6,900 dollars installed."),      # filler
        chat("嗯嗯，电池多少钱？", "Vault 10 电池安装好是六千九百美元。"),                       # filler (zh)
        chat("嗯嗯", "Hello!"),                                                               # emptied -> dropped
        chat("Can I talk to a person?", "Let me transfer you to a human agent now."),        # banned -> dropped
        chat("Can I talk to a person?", "I can answer here; what do you need?"),             # kept (user asks)
        chat("Do you sell umbrellas?", "No, only solar equipment."),                          # 'um' inside a word
        chat("What warranty do panels have?", LONG),
        chat("what  warranty do PANELS have?", LONG),                                         # exact dup
        chat("What warranty do panels have?", LONG.replace("three weeks", "four weeks")),     # near dup
        chat("Are you open on Saturday?", "Yes, from nine to one."),
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = validate(tiny_config(tmp_path, data, eval_split=0.0, dedup_exact=True, dedup_near=0.7,
                               filler_words=["嗯嗯", "um"], banned_phrases=["Transfer you to a HUMAN agent"]))
    stats = prepare(cfg, tokenizer, **QUIET).stats
    assert stats.cleaning == {"filler_rows": 3, "filler_emptied_rows": 1, "banned_rows": 1,
                              "exact_dup_rows": 1, "near_dup_rows": 1}
    assert stats.train_rows == 6

    clean = Cleaner(filler_words=["嗯嗯", "um"])
    assert clean([{"role": "user", "content": "I want, um, a quote"}])[0]["content"] == "I want, a quote"
    assert clean([{"role": "user", "content": "Um, umbrellas?"}])[0]["content"] == "umbrellas?"
    assert clean([{"role": "user", "content": "嗯嗯嗯嗯，我想要报价"}])[0]["content"] == "我想要报价"


# --- streamed, sharded, cached tokenisation -----------------------------------------------------------

def many_rows(n: int = 23) -> list[dict]:
    base = tiny_rows()
    return [{"messages": [dict(m, content=f"{m['content']} (#{i})") for m in base[i % len(base)]["messages"]]}
            for i in range(n)]


def test_sharded_stream_equals_plain_path_and_caches_shards(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", many_rows())
    plain = [tokenize_conversation(tokenizer, c, MaskOptions(max_length=96))
             for c in read_jsonl(data).conversations]
    logs: list[str] = []
    cfg = validate(tiny_config(tmp_path, data, eval_split=0.0, shard_rows=5, packing=False))
    first = prepare(cfg, tokenizer, log=logs.append)
    assert first.stats.shards["train"] == [f"train-{i:05d}" for i in range(5)]
    assert rows_of(first.train) == [(e.input_ids, e.labels) for e in plain]
    one_shard = prepare(validate(tiny_config(tmp_path, data, eval_split=0.0, shard_rows=1000, packing=False)),
                        tokenizer, **QUIET)
    assert rows_of(one_shard.train) == rows_of(first.train)
    again = prepare(cfg, tokenizer, **QUIET)
    assert again.cache_hit and rows_of(again.train) == rows_of(first.train)

    # A run killed mid-way keeps its finished shards: the rerun tokenises only what is missing.
    cache = first.train.cache_files[0]["filename"].rsplit("/", 1)[0]
    from pathlib import Path

    cache = Path(cache)
    (cache / "stats.json").unlink()
    (cache / "train-00003.json").unlink()
    logs.clear()
    resumed = prepare(cfg, tokenizer, log=logs.append)
    assert not resumed.cache_hit and rows_of(resumed.train) == rows_of(first.train)
    assert sum("data: tokenised train-" in m for m in logs) == 1 and any("reused 4 shards" in m for m in logs)

    # The eval split is exact and drawn by row index, the same whatever the shard size.
    split = prepare(validate(tiny_config(tmp_path, data, eval_split=0.2, shard_rows=4)), tokenizer, **QUIET)
    assert split.stats.eval_rows == 5 and split.stats.train_rows == 18


def test_ranks_tokenise_alternate_shards(tmp_path, tokenizer):
    """Two ranks (as torchrun would start) share the work: each writes every other shard, both map all."""
    convs = read_jsonl(write_jsonl(tmp_path / "d.jsonl", many_rows())).conversations
    tok = partial(SftShard, tokenizer, MaskOptions(max_length=96), False)
    results, logs = {}, {0: [], 1: []}

    def run(rank):
        stream = (("train", c) for c in convs)
        results[rank] = shards.build(tmp_path / "c", stream, tok, shard_rows=5, ranks=(rank, 2),
                                     log=logs[rank].append)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert results[0] == results[1] and results[0][1]["rows"] == 23
    assert [m.split()[2] for m in logs[0]] == ["train-00000:", "train-00002:", "train-00004:"]
    assert [m.split()[2] for m in logs[1]] == ["train-00001:", "train-00003:"]


def test_trainer_reshuffles_rows_across_shards_each_epoch(tmp_path, tokenizer, model):
    from transformers import Trainer, TrainingArguments

    from training.data.packing import collator_for

    data = write_jsonl(tmp_path / "d.jsonl", many_rows())
    cfg = validate(tiny_config(tmp_path, data, eval_split=0.0, shard_rows=5, packing=False))
    ds = prepare(cfg, tokenizer, **QUIET).train
    index = {tuple(r["input_ids"]): i for i, r in enumerate(ds)}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, seed=7,
                             report_to="none", remove_unused_columns=False, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator_for(cfg, tokenizer))
    loader = trainer.get_train_dataloader()
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        order = [index[tuple(ids[m.bool()].tolist())]
                 for b in loader for ids, m in zip(b["input_ids"], b["attention_mask"])]
        orders.append(order)
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(23))
    assert orders[0] != orders[1]
    # Each epoch's first batches draw from several shards (5 rows per shard), not one shard at a time.
    assert len({i // 5 for i in orders[0][:8]}) > 2 and len({i // 5 for i in orders[1][:8]}) > 2
