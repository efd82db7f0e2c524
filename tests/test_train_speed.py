"""What makes the default `train` fast must not change what it learns: the head on trained tokens only
gives the model's own loss and gradients; the host-memory mode is chosen from the estimate."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from tests.conftest import tiny_rows
from training.data.packing import PackedCollator, pack
from training.data.processor import IGNORE, MaskOptions, tokenize_conversation
from training.head_loss import decoder_and_head, trained_token_loss


@pytest.fixture(scope="module")
def lora_model(base_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config).train()


def batches(tokenizer):
    examples = [tokenize_conversation(tokenizer, r["messages"], MaskOptions(max_length=128)) for r in tiny_rows()[:4]]
    width = max(len(e.input_ids) for e in examples)
    padded = {"input_ids": torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (width - len(e.input_ids))
                                         for e in examples]),
              "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids))
                                              for e in examples]),
              "labels": torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in examples])}
    rows = pack(examples, 2 * width)
    packed = PackedCollator(tokenizer.pad_token_id)([dict(zip(rows, vals)) for vals in zip(*rows.values())])
    return {"padded": padded, "packed": packed}


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,counted", [("padded", True), ("packed", False)])
def test_head_on_trained_tokens_gives_the_models_loss_and_gradients(lora_model, tokenizer, kind, counted):
    batch = batches(tokenizer)[kind]
    n_items = int((batch["labels"][:, 1:] != IGNORE).sum()) + 7 if counted else None  # as if accumulated
    extra = {"num_items_in_batch": n_items} if counted else {}
    want = lora_model(**batch, **extra).loss
    want_grads = grads_of(lora_model, want)
    got = trained_token_loss(*decoder_and_head(lora_model), batch, n_items)
    got_grads = grads_of(lora_model, got)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 100
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4)


def test_methods_that_change_the_forward_keep_the_models_loss(base_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert decoder_and_head(model) is not None  # a plain model (full, freeze)
    prompt = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert decoder_and_head(prompt) is None  # virtual tokens are prepended by PeftModel.forward


def test_auto_host_memory_is_fast_unless_the_estimate_comes_near_available_memory():
    from training.config import validate
    from training.memory_mode import GiB, choose, predicted_peak, resolve

    assert choose(2 * GiB, 20 * GiB)[0] == "fast"
    mode, why = choose(2 * GiB, 3 * GiB)  # 2.5 GiB fast peak > 80% of 3 GiB
    assert mode == "bounded" and "too close" in why
    assert choose(2 * GiB, 20 * GiB, processes=8)[0] == "bounded"  # eight ranks of 2.5 GiB
    assert choose(None, 20 * GiB)[0] == "bounded"
    cfg = validate({"train_file": "examples/data/sales_chat.jsonl", "max_length": 256})
    assert 1 * GiB < predicted_peak(cfg) < 4 * GiB  # the SmolLM2 LoRA estimate, on this machine's 24 GiB
    mode, why = resolve(cfg, on_cpu=True)
    assert mode == "fast" and why.startswith("auto: estimated peak")
    assert resolve(cfg.model_copy(update={"host_memory": "bounded"}), on_cpu=True) == ("bounded", None)
    assert resolve(validate({"train_file": "x.jsonl", "base_model": "/no/such/model"}), on_cpu=True)[0] == "bounded"


def test_sft_packs_by_default_and_only_unpacked_rows_group_by_length():
    from kernel.errors import GuardtuneError
    from training.config import validate

    assert validate({"train_file": "x.jsonl"}).packing is True
    assert validate({"train_file": "x.jsonl", "stage": "pt"}).packing is False
    assert validate({"train_file": "x.jsonl", "packing": False, "group_by_length": True}).group_by_length
    with pytest.raises(GuardtuneError, match="group_by_length applies to unpacked sft rows"):
        validate({"train_file": "x.jsonl", "group_by_length": True})


def test_reentrant_checkpoints_in_one_process_give_the_same_gradients(lora_model, tokenizer):
    from training.config import validate
    from training.sft import reentrant_checkpointing

    lora = {"train_file": "x.jsonl", "gradient_checkpointing": True}
    assert reentrant_checkpointing(validate(lora))
    assert not reentrant_checkpointing(validate(lora | {"fsdp": True}))
    assert not reentrant_checkpointing(validate(lora | {"method": "qlora"}))
    assert not reentrant_checkpointing(validate(lora | {"gradient_checkpointing": False}))

    batch = batches(tokenizer)["packed"]
    plain = grads_of(lora_model, trained_token_loss(*decoder_and_head(lora_model), batch, None))
    lora_model.enable_input_require_grads()  # as sft.trainer does for a frozen embedding
    lora_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    try:
        checkpointed = grads_of(lora_model, trained_token_loss(*decoder_and_head(lora_model), batch, None))
    finally:
        lora_model.gradient_checkpointing_disable()
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)
