"""One training run: resolve base, prepare data, wrap with PEFT, train with the HF Trainer, publish.

The adapter is published atomically to `adapter_dir` with its manifest; checkpoints live in
`checkpoint_dir` so that `resume: auto` can continue a killed run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.manifest import BaseModelRef, Manifest, Metrics
from kernel.models import resolve_base_model, weights_sha256
from training.config import TrainConfig
from training.distributed import runtime as dist

RUN_STATE = "guardtune_run.json"


def stop_tokens(tokenizer, base_dir: Path) -> list[str]:
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(base_dir).eos_token_id
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    names = [tokenizer.convert_ids_to_tokens(i) for i in dict.fromkeys(ids)]
    return [n for n in names if n]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint that finished writing; a kill mid-save leaves one without trainer_state.json.

    PEFT runs checkpoint adapter_model.*; full/freeze runs checkpoint the whole model (model*.safetensors).
    """
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for ckpt in reversed(ckpts):
        weights = [*ckpt.glob("adapter_model.*"), *ckpt.glob("model*.safetensors"), *ckpt.glob("pytorch_model*.bin")]
        if (ckpt / "trainer_state.json").is_file() and weights:
            return ckpt
    return None


def _resume_point(cfg: TrainConfig, run_dir: Path, log) -> Path | None:
    state = run_dir / RUN_STATE
    ckpt = latest_checkpoint(run_dir) if cfg.resume == "auto" else None
    if ckpt is not None:
        recorded = json.loads(state.read_text()).get("fingerprint") if state.is_file() else None
        if recorded != cfg.fingerprint():
            raise GuardtuneError(
                f"{run_dir} holds checkpoints of a different config; set run_dir to a new directory "
                "or resume=never to start over there"
            )
        log(f"resume: continuing from {ckpt}")
    elif cfg.resume == "never" and run_dir.exists() and dist.is_main():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():  # distributed: one writer
        state.write_text(json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.model_dump(mode="json")}, indent=2))
    return ckpt


def train(cfg: TrainConfig, *, log=print) -> Path:
    import torch

    from training.host_memory import configure

    done = configure(cfg.host_memory, on_cpu=not torch.cuda.is_available())
    if done and dist.is_main():
        log(done)
    if cfg.stage == "dpo":  # preference pairs: TRL's DPOTrainer, its own data and loop (training/dpo.py)
        from training.dpo import train_dpo

        return train_dpo(cfg, log=log)
    from transformers import (
        Trainer,
        TrainingArguments,
        set_seed,
    )
    from transformers.trainer_callback import ProgressCallback

    from training import peft_setup
    from training.callbacks import MetricsCallback, QuietProgress
    from training.data.dataset import prepare
    from training.data.packing import collator_for
    from training.data.processor import Example, show_mask
    from training.tracking import ConsoleLogger, FanOut, JsonlLogger

    if not dist.is_main():  # distributed: progress and logs come from rank 0 only
        log = lambda msg: None  # noqa: E731
    t_start = time.time()
    base_dir, tokenizer = base_and_tokenizer(cfg, log)

    data = prepare(cfg, tokenizer, log=log)
    s = data.stats
    log(f"data: {s.train_rows} train / {s.eval_rows} eval conversations, {s.trained_tokens}/{s.total_tokens} "
        f"tokens trained, {s.truncated_rows} truncated, {s.untrainable_rows} fully masked and dropped, "
        f"{len(s.bad_rows)} bad rows skipped")
    first = data.train[0]
    log("example 0, trained tokens in [[...]]:\n" + show_mask(tokenizer, Example(first["input_ids"], first["labels"])))

    run_dir = cfg.checkpoint_dir
    decided, resume_from = dist.resume_from_launcher()  # distributed: chosen once, before the ranks started
    if not decided:
        resume_from = _resume_point(cfg, run_dir, log)
    set_seed(cfg.seed)
    model = peft_setup.load_base(cfg, base_dir)
    model, trainable, total = peft_setup.wrap(cfg, model, base_dir)
    log(f"model: {peft_setup.describe(cfg)} on {cfg.base_model}: "
        f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable")

    steps_per_epoch = math.ceil(len(data.train) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)
    loggers = [ConsoleLogger(total_steps), JsonlLogger(run_dir / "metrics.jsonl")] if dist.is_main() else []
    if cfg.report_to == "swanlab" and dist.is_main():
        from training.tracking import SwanLabLogger

        loggers.append(SwanLabLogger(run_dir / "swanlog", cfg.swanlab_project, cfg.task))
        log(f"tracking: SwanLab local run in {run_dir / 'swanlog'}; view with "
            f"`.venv/bin/swanlab watch {run_dir / 'swanlog'}`")
    tracker = FanOut(*loggers)
    tracker.log_config(cfg.model_dump(mode="json") | {"trainable_params": trainable, "train_rows": s.train_rows})

    common = trainer_arguments(cfg, run_dir, total_steps, has_eval=data.eval is not None)
    args = dist.resolved(TrainingArguments(**dist.training_arguments(cfg, model, dict(  # distributed: ds/fsdp/backend
        common, gradient_checkpointing=peft_setup.trainer_checkpointing(cfg), remove_unused_columns=False))))
    collator = collator_for(cfg, tokenizer)  # packed rows (sft packing) or rows padded per batch
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=collator, callbacks=[MetricsCallback(tracker)])
    dist.cpu_fsdp(trainer)  # distributed: accelerate keeps FSDP off on CPU; turn it on before the model is wrapped
    dist.report_shards(trainer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)

    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        metrics = Metrics(train_loss=_final_train_loss(trainer.state.log_history, result.training_loss))
        if data.eval is not None:
            metrics.eval_loss = trainer.evaluate()["eval_loss"]
            tracker.log({"eval_loss": metrics.eval_loss}, trainer.state.global_step)
        metrics.train_runtime_s = round(time.time() - t_start, 1)
        metrics.steps = trainer.state.global_step
        metrics.trainable_params = trainable
        if cfg.eval_forgetting:  # base vs adapter on a general set, while the model is in memory
            from training.evaluate import forgetting_after_training

            metrics.forgetting = forgetting_after_training(
                cfg, model, tokenizer, tokenizer.convert_tokens_to_ids(stop_tokens(tokenizer, base_dir)), log=log)
    finally:
        tracker.close()

    stops = stop_tokens(tokenizer, base_dir)
    manifest = Manifest(
        task=cfg.task,
        base_model=BaseModelRef(id=cfg.base_model, path=str(base_dir), sha256=weights_sha256(base_dir)),
        **peft_setup.manifest_fields(cfg),  # method, artifact, serve_with, rank, alpha, target_modules
        chat_template=tokenizer.chat_template,
        system_prompt=cfg.system_prompt,
        stop_tokens=stops,
        max_context=int(getattr(model.config, "max_position_embeddings", cfg.max_length)),
        data_fingerprint=data.fingerprint,
        metrics=metrics,
        train_config=cfg.model_dump(mode="json"),
        data_mix=data.stats.data_mix,
    )
    # distributed: rank 0 publishes; ZeRO-3/FSDP shards are gathered through the Trainer first
    # full/freeze: the directory also gets the tokenizer (chat template) and generation config, to serve as a base
    dist.save_adapter(trainer, cfg.adapter_dir, model.save_pretrained,
                      lambda tmp: (peft_setup.finish_artifact(cfg, tokenizer, tmp, base_dir), manifest.write(tmp)))
    log(f"adapter: wrote {cfg.adapter_dir} (train loss {metrics.train_loss:.4f}"
        + (f", eval loss {metrics.eval_loss:.4f}" if metrics.eval_loss is not None else "") + ")")

    sample_file = cfg.eval_file or cfg.train_file or next((d.path for d in cfg.datasets or [] if d.path), None)
    convs = []
    if cfg.generation_samples and sample_file and dist.is_main() and cfg.stage == "sft":  # pt data has no chats
        from training.data.readers import read_jsonl

        convs = read_jsonl(sample_file, skip_bad_rows=True).conversations[: cfg.generation_samples]
    return after_publish(cfg, trainer, model, tokenizer, convs, tokenizer.convert_tokens_to_ids(stops), log)


def after_publish(cfg: TrainConfig, trainer, model, tokenizer, conversations: list, stop_ids: list[int], log) -> Path:
    """Once the artifact is in place (SFT/pt and DPO): rank 0 prints base-vs-tuned replies for
    `conversations` and merges when asked; then every rank meets before exit."""
    if conversations and dist.is_main():
        from training.generate import compare, print_comparison

        gen_model = dist.generation_model(trainer, model, cfg.adapter_dir)
        print_comparison(compare(gen_model, tokenizer, conversations, system_prompt=cfg.system_prompt,
                                 stop_ids=stop_ids), log)
    if cfg.merge and dist.is_main():
        from training.export import merge

        merge(cfg.adapter_dir, Path(f"{cfg.adapter_dir}-merged"), log=log)
    dist.finish()  # all ranks meet before exit
    return cfg.adapter_dir


def base_and_tokenizer(cfg: TrainConfig, log) -> tuple[Path, object]:
    """The resolved base directory and its tokenizer, which must carry a chat template."""
    from transformers import AutoTokenizer

    base_dir = resolve_base_model(cfg.base_model, log=log)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if not tokenizer.chat_template:
        raise GuardtuneError(f"base model {cfg.base_model}: tokenizer has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base_dir, tokenizer


def trainer_arguments(cfg: TrainConfig, run_dir: Path, total_steps: int, *, has_eval: bool) -> dict:
    """The HF TrainingArguments that SFT/pt and DPO (TRL's DPOConfig) share, from the one config."""
    import torch

    from training import peft_setup

    on_cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(run_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(cfg.warmup_ratio * total_steps),
        max_steps=total_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # bf16 matmuls are several times slower on CPUs (peft_setup.compute_dtype); TRL defaults to bf16.
        bf16=on_cuda and peft_setup.compute_dtype(cfg) == torch.bfloat16,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=on_cuda,
        disable_tqdm=False,
    )


def _final_train_loss(history: list[dict], fallback: float) -> float:
    """The last logged step loss (the run average hides whether training converged)."""
    losses = [h["loss"] for h in history if "loss" in h]
    return float(losses[-1]) if losses else float(fallback)
