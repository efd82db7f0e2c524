"""The run skeleton every stage shares: base and tokenizer, resume, trainer arguments, trackers, the
train/evaluate loop, and the atomic publication of the artifact with its manifest.

A stage (training/sft.py for sft and pt, training/dpo.py) only builds its dataset and its trainer:

    data(cfg, tokenizer, log) -> StageData
    trainer(run, data, callbacks) -> (trainer, trainable parameters)
    metrics(history, evaluated) -> dict      extra manifest metrics from the trainer's log
    summary(metrics) -> str                  the losses named in the "adapter: wrote" line
    samples(cfg, data) -> list               conversations for the base-vs-tuned replies

Checkpoints live in `checkpoint_dir` so that `resume: auto` can continue a killed run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from kernel.manifest import BaseModelRef, Manifest, Metrics
from kernel.models import weights_sha256
from training import peft_setup
from training.base_model import base_and_tokenizer, stop_tokens
from training.callbacks import MetricsCallback, QuietProgress
from training.checkpoints import resume_point
from training.config import TrainConfig
from training.distributed import runtime as dist
from training.evaluate import forgetting_after_training
from training.export import merge
from training.generate import compare, print_comparison
from training.tracking import ConsoleLogger, FanOut, JsonlLogger, SwanLabLogger


@dataclass
class StageData:
    train: object  # what the trainer steps over: a datasets.Dataset or a list of rows
    eval: object | None
    rows: int  # conversations, documents or pairs, for the tracked config
    fingerprint: str  # of the data files, recorded in the manifest
    data_mix: list[dict] | None = None


class Stage(Protocol):
    def data(self, cfg: TrainConfig, tokenizer, log) -> StageData: ...
    def trainer(self, run: "Run", data: StageData, callbacks: list) -> tuple[object, int]: ...
    def metrics(self, history: list[dict], evaluated: dict | None) -> dict: ...
    def summary(self, metrics: Metrics) -> str: ...
    def samples(self, cfg: TrainConfig, data: StageData) -> list: ...


@dataclass
class Run:
    """What a stage's trainer is built from."""

    cfg: TrainConfig
    base_dir: Path
    tokenizer: object
    total_steps: int
    log: Callable[[str], None]

    def arguments(self, cls, model, *, has_eval: bool, **extra):
        """`cls` (TrainingArguments or TRL's config) from the shared settings, `extra`, and the
        distributed switches (backend, DeepSpeed or FSDP; those need the model)."""
        kwargs = trainer_arguments(self.cfg, self.cfg.checkpoint_dir, self.total_steps, has_eval=has_eval) | extra
        return dist.resolved(cls(**dist.training_arguments(self.cfg, model, kwargs)))


def execute(cfg: TrainConfig, stage: Stage, *, log=print) -> Path:
    """Train one stage and publish its artifact to `adapter_dir`; returns that directory."""
    from transformers import set_seed

    if not dist.is_main():  # progress and logs come from rank 0 only
        log = _silent
    t_start = time.time()
    base_dir, tokenizer = base_and_tokenizer(cfg, log)
    data = stage.data(cfg, tokenizer, log)
    decided, resume_from = dist.resume_from_launcher()  # chosen once, before the ranks started
    if not decided:
        resume_from = resume_point(cfg, cfg.checkpoint_dir, log, writer=dist.is_main())
    set_seed(cfg.seed)
    run = Run(cfg, base_dir, tokenizer, total_steps(cfg, len(data.train)), log)
    stop_ids = tokenizer.convert_tokens_to_ids(stop_tokens(tokenizer, base_dir))
    tracker = trackers(cfg, run.total_steps, log)
    try:  # from here on a failure (model load, PEFT, trainer) still closes the tracker's experiment
        trainer, trainable = stage.trainer(run, data, [MetricsCallback(tracker)])
        model = _settle(trainer)
        tracker.log_config(cfg.model_dump(mode="json") | {"trainable_params": trainable, "train_rows": data.rows})
        metrics = fit(trainer, stage, tracker, resume_from, has_eval=data.eval is not None)
        metrics.train_runtime_s = round(time.time() - t_start, 1)
        metrics.trainable_params = trainable
        if cfg.eval_forgetting:  # base vs adapter on a general set, while the model is in memory
            metrics.forgetting = forgetting_after_training(cfg, model, tokenizer, stop_ids, log=log)
    finally:
        tracker.close()
    publish(run, trainer, model, metrics, data)
    log(f"adapter: wrote {cfg.adapter_dir} ({stage.summary(metrics)})")
    samples = stage.samples(cfg, data) if cfg.generation_samples and dist.is_main() else []
    return after_publish(cfg, trainer, model, tokenizer, samples, stop_ids, log)


def total_steps(cfg: TrainConfig, train_rows: int) -> int:
    steps_per_epoch = math.ceil(train_rows / (cfg.batch_size * cfg.grad_accum))
    return cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)


def trackers(cfg: TrainConfig, total: int, log) -> FanOut:
    """Console, metrics.jsonl and (report_to: swanlab) SwanLab, on rank 0 only."""
    if not dist.is_main():
        return FanOut()
    run_dir = cfg.checkpoint_dir
    loggers = [ConsoleLogger(total), JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.report_to == "swanlab":
        loggers.append(SwanLabLogger(run_dir / "swanlog", cfg.swanlab_project, cfg.task))
        log(f"tracking: SwanLab local run in {run_dir / 'swanlog'}; view with "
            f"`.venv/bin/swanlab watch {run_dir / 'swanlog'}`")
    return FanOut(*loggers)


def _settle(trainer):
    """Ready a built trainer for the run: sharding switched on and reported, our progress bar; its model."""
    from transformers.trainer_callback import ProgressCallback

    dist.cpu_fsdp(trainer)  # accelerate keeps FSDP off on CPU; turn it on before the model is wrapped
    dist.report_shards(trainer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)
    return trainer.model


def fit(trainer, stage: Stage, tracker: FanOut, resume_from: Path | None, *, has_eval: bool) -> Metrics:
    """Train (from the checkpoint, if any), then evaluate: the run's metrics."""
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = trainer.state.log_history
    metrics = Metrics(train_loss=final_train_loss(history, result.training_loss))
    evaluated = trainer.evaluate() if has_eval else None
    for name, value in stage.metrics(history, evaluated).items():
        setattr(metrics, name, value)
    if evaluated is not None:
        metrics.eval_loss = evaluated["eval_loss"]
        tracker.log({"eval_loss": metrics.eval_loss}, trainer.state.global_step)
    metrics.steps = trainer.state.global_step
    return metrics


def final_train_loss(history: list[dict], fallback: float) -> float:
    """The last logged step loss (the run average hides whether training converged)."""
    losses = [h["loss"] for h in history if "loss" in h]
    return float(losses[-1]) if losses else float(fallback)


def publish(run: Run, trainer, model, metrics: Metrics, data: StageData) -> None:
    """The artifact and its manifest, atomically in `adapter_dir`; rank 0 writes, ZeRO-3/FSDP shards
    are gathered through the Trainer first. A full/freeze directory also gets the tokenizer (chat
    template) and generation config, to serve as a base."""
    cfg, tokenizer, base_dir = run.cfg, run.tokenizer, run.base_dir
    manifest = Manifest(
        task=cfg.task,
        base_model=BaseModelRef(id=cfg.base_model, path=str(base_dir), sha256=weights_sha256(base_dir)),
        **peft_setup.manifest_fields(cfg),  # method, artifact, serve_with, rank, alpha, target_modules
        chat_template=tokenizer.chat_template,
        system_prompt=cfg.system_prompt,
        stop_tokens=stop_tokens(tokenizer, base_dir),
        max_context=int(getattr(model.config, "max_position_embeddings", cfg.max_length)),
        data_fingerprint=data.fingerprint,
        metrics=metrics,
        train_config=cfg.model_dump(mode="json"),
        data_mix=data.data_mix,
    )
    dist.save_adapter(trainer, cfg.adapter_dir, model.save_pretrained,
                      lambda tmp: (peft_setup.finish_artifact(cfg, tokenizer, tmp, base_dir), manifest.write(tmp)))


def after_publish(cfg: TrainConfig, trainer, model, tokenizer, conversations: list, stop_ids: list[int], log) -> Path:
    """Once the artifact is in place: rank 0 prints base-vs-tuned replies for `conversations` and
    merges when asked; then every rank meets before exit."""
    if conversations and dist.is_main():
        gen_model = dist.generation_model(trainer, model, cfg.adapter_dir)
        print_comparison(compare(gen_model, tokenizer, conversations, system_prompt=cfg.system_prompt,
                                 stop_ids=stop_ids), log)
    if cfg.merge and dist.is_main():
        merge(cfg.adapter_dir, Path(f"{cfg.adapter_dir}-merged"), log=log)
    dist.finish()  # all ranks meet before exit
    return cfg.adapter_dir


def trainer_arguments(cfg: TrainConfig, run_dir: Path, total_steps: int, *, has_eval: bool) -> dict:
    """The HF TrainingArguments that SFT/pt and DPO (TRL's DPOConfig) share, from the one config."""
    import torch

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
        use_liger_kernel=liger_kernel_applies(cfg, on_cuda=on_cuda),
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=on_cuda,
        disable_tqdm=False,
    )


def liger_kernel_applies(cfg: TrainConfig, *, on_cuda: bool) -> bool:
    """Liger's Triton kernels run on CUDA only; the Trainer patches the model (through PEFT) with them."""
    from transformers.utils import is_liger_kernel_available

    return cfg.liger_kernel and on_cuda and is_liger_kernel_available()


def _silent(msg: str) -> None:
    pass
