"""`stage: sft` (chats with label masks) and `stage: pt` (raw text in blocks): the HF Trainer on the
tokenised, cached dataset, with the model wrapped by the configured PEFT (or full/freeze) method."""

from __future__ import annotations

from kernel.manifest import FULL_METHODS, LORA_METHODS, Metrics
from training import peft_setup
from training.config import TrainConfig
from training.data.dataset import prepare
from training.data.packing import collator_for
from training.data.processor import Example, show_mask
from training.data.readers import read_jsonl
from training.distributed import runtime as dist
from training.replay import replay_files
from training.run import Run, StageData


def data(cfg: TrainConfig, tokenizer, log) -> StageData:
    prepared = prepare(cfg, tokenizer, replays=replay_files(cfg, tokenizer, log=log), log=log)
    s = prepared.stats
    packed = f" (packed into {s.train_sequences} rows)" if cfg.stage == "sft" and cfg.packing else ""
    log(f"data: {s.train_rows} train / {s.eval_rows} eval conversations{packed}, {s.trained_tokens}/{s.total_tokens} "
        f"tokens trained, {s.truncated_rows} truncated, {s.untrainable_rows} fully masked and dropped, "
        f"{len(s.bad_rows)} bad rows skipped")
    first = prepared.train[0]
    log("example 0, trained tokens in [[...]]:\n" + show_mask(tokenizer, Example(first["input_ids"], first["labels"])))
    return StageData(prepared.train, prepared.eval, s.train_rows, prepared.fingerprint, s.data_mix)


def trainer(run: Run, data: StageData, callbacks: list) -> tuple[object, int]:
    from transformers import TrainingArguments

    from training.head_loss import TrainedTokensTrainer  # lazy: transformers' Trainer is slow to import

    cfg = run.cfg
    model = peft_setup.load_base(cfg, run.base_dir)
    model, trainable, total = peft_setup.wrap(cfg, model, run.base_dir)
    run.log(f"model: {peft_setup.describe(cfg)} on {cfg.base_model}: "
            f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable")
    reentrant = reentrant_checkpointing(cfg)
    if reentrant and not model.get_input_embeddings().weight.requires_grad:
        model.enable_input_require_grads()  # a reentrant checkpoint passes gradients only to inputs that need them
    args = run.arguments(TrainingArguments, model, has_eval=data.eval is not None,
                         gradient_checkpointing=peft_setup.trainer_checkpointing(cfg), remove_unused_columns=False,
                         gradient_checkpointing_kwargs={"use_reentrant": reentrant},
                         train_sampling_strategy="group_by_length" if cfg.group_by_length else "random")
    collator = collator_for(cfg, run.tokenizer)  # packed rows (sft packing) or rows padded per batch
    return TrainedTokensTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                data_collator=collator, callbacks=callbacks), trainable


def reentrant_checkpointing(cfg: TrainConfig) -> bool:
    """Reentrant checkpoints made a LoRA step 1.11x as fast on CPU, with 7% less peak RSS
    (bench/results/train_candidates.md). Kept to one process and the LoRA family, full and freeze:
    DDP, FSDP and DeepSpeed, QLoRA's prepared model and the prompt methods keep non-reentrant ones."""
    return (peft_setup.trainer_checkpointing(cfg) and cfg.method in (*LORA_METHODS, *FULL_METHODS)
            and not cfg.quantized and not cfg.distributed and not dist.launched())


def metrics(history: list[dict], evaluated: dict | None) -> dict:
    return {}


def summary(m: Metrics) -> str:
    return f"train loss {m.train_loss:.4f}" + (f", eval loss {m.eval_loss:.4f}" if m.eval_loss is not None else "")


def samples(cfg: TrainConfig, data: StageData) -> list:
    """The first conversations of the eval (else train) data; pt text has no chats to answer."""
    sample_file = cfg.eval_file or cfg.train_file or next((d.path for d in cfg.datasets or [] if d.path), None)
    if not sample_file or cfg.stage != "sft":
        return []
    return read_jsonl(sample_file, skip_bad_rows=True).conversations[: cfg.generation_samples]
