"""`stage: sft` (chats with label masks) and `stage: pt` (raw text in blocks): the HF Trainer on the
tokenised, cached dataset, with the model wrapped by the configured PEFT (or full/freeze) method."""

from __future__ import annotations

from kernel.manifest import Metrics
from training import peft_setup
from training.config import TrainConfig
from training.data.dataset import prepare
from training.data.packing import collator_for
from training.data.processor import Example, show_mask
from training.data.readers import read_jsonl
from training.replay import replay_files
from training.run import Run, StageData


def data(cfg: TrainConfig, tokenizer, log) -> StageData:
    prepared = prepare(cfg, tokenizer, replays=replay_files(cfg, tokenizer, log=log), log=log)
    s = prepared.stats
    log(f"data: {s.train_rows} train / {s.eval_rows} eval conversations, {s.trained_tokens}/{s.total_tokens} "
        f"tokens trained, {s.truncated_rows} truncated, {s.untrainable_rows} fully masked and dropped, "
        f"{len(s.bad_rows)} bad rows skipped")
    first = prepared.train[0]
    log("example 0, trained tokens in [[...]]:\n" + show_mask(tokenizer, Example(first["input_ids"], first["labels"])))
    return StageData(prepared.train, prepared.eval, s.train_rows, prepared.fingerprint, s.data_mix)


def trainer(run: Run, data: StageData, callbacks: list) -> tuple[object, int]:
    from transformers import Trainer, TrainingArguments

    cfg = run.cfg
    model = peft_setup.load_base(cfg, run.base_dir)
    model, trainable, total = peft_setup.wrap(cfg, model, run.base_dir)
    run.log(f"model: {peft_setup.describe(cfg)} on {cfg.base_model}: "
            f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable")
    args = run.arguments(TrainingArguments, model, has_eval=data.eval is not None,
                         gradient_checkpointing=peft_setup.trainer_checkpointing(cfg), remove_unused_columns=False)
    collator = collator_for(cfg, run.tokenizer)  # packed rows (sft packing) or rows padded per batch
    return Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                   data_collator=collator, callbacks=callbacks), trainable


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
