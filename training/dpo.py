"""`stage: dpo`: a LoRA/DoRA adapter trained with TRL's DPOTrainer on preference pairs.

The input is TRL's conversational preference form, exactly what `guardtune badcases export`
writes: {"prompt": [messages ending in a user turn], "chosen": [{"role": "assistant", ...}],
"rejected": [{"role": "assistant", ...}], "meta": {...}}. Plain strings are accepted for the three
fields too. A bad row stops the run with `file:line: reason`, or is counted with skip_bad_rows.

The reference model is the base itself: TRL disables the adapter to score it, so no second copy
of the weights is held. The adapter is published like an SFT one (manifest, atomic directory),
with TRL's reward margin and accuracy in its metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.manifest import BaseModelRef, Manifest, Metrics
from kernel.models import weights_sha256
from training.data.readers import BadRow, check_alternation, checked_turns, utf8_lines

# TRL metric name -> manifest metric name
REWARD_METRICS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
                  "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"}


class BadPair(BadRow):
    pass


@dataclass
class Preferences:
    rows: list[dict]
    bad_rows: list[str] = field(default_factory=list)


def read_preferences(path: str | Path, *, skip_bad_rows: bool = False) -> Preferences:
    path = Path(path)
    lines = utf8_lines(path, "data")
    out = Preferences(rows=[])
    for lineno, line in enumerate(lines, start=1):
        try:
            if not line.strip():
                raise BadPair("empty line")
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadPair(f"invalid JSON ({exc.msg})") from None
            out.rows.append(normalise_pair(raw))
        except BadRow as exc:  # also the shared turn checks of training.data.readers
            where = f"{path}:{lineno}: {exc}"
            if not skip_bad_rows:
                raise GuardtuneError(f"{where} (use skip_bad_rows=true to count and skip bad rows)") from None
            out.bad_rows.append(where)
    if not out.rows:
        raise GuardtuneError(f"data {path}: no usable preference rows")
    return out


def normalise_pair(row: object) -> dict:
    """One preference row as {prompt: [messages ending in user], chosen: [assistant], rejected: [assistant]}."""
    if not isinstance(row, dict):
        raise BadPair("row is not a JSON object")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise BadPair(f"preference row needs 'prompt', 'chosen' and 'rejected' (missing {', '.join(missing)})")
    prompt = _prompt(row["prompt"])
    chosen, rejected = _reply(row["chosen"], "chosen"), _reply(row["rejected"], "rejected")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise BadPair("chosen equals rejected: nothing to prefer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt(raw: object) -> list[dict]:
    if isinstance(raw, str) and raw.strip():
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise BadPair("'prompt' must be a non-empty list of messages (or a string)")
    out, turns = checked_turns(raw, "prompt message")
    if not turns or turns[0] != "user" or turns[-1] != "user":
        raise BadPair("'prompt' must start and end with a user turn (after an optional system turn)")
    check_alternation(turns, "prompt has ")
    return out


def _reply(raw: object, key: str) -> list[dict]:
    if isinstance(raw, str):
        raw = [{"role": "assistant", "content": raw}]
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict):
        raise BadPair(f"'{key}' must be one assistant message (or a string)")
    m = raw[0]
    if m.get("role") != "assistant":
        raise BadPair(f"'{key}' must be an assistant message, not {m.get('role')!r}")
    if not isinstance(m.get("content"), str) or not m["content"].strip():
        raise BadPair(f"'{key}' has empty or non-string content")
    return [{"role": "assistant", "content": m["content"]}]


def split(cfg, log) -> tuple[list[dict], list[dict], list[str]]:
    train = read_preferences(cfg.train_file, skip_bad_rows=cfg.skip_bad_rows)
    bad = list(train.bad_rows)
    if cfg.eval_file:
        ev = read_preferences(cfg.eval_file, skip_bad_rows=cfg.skip_bad_rows)
        bad += ev.bad_rows
        train_rows, eval_rows = train.rows, ev.rows
    else:
        order = list(range(len(train.rows)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = int(round(len(order) * cfg.eval_split)) if len(order) > 1 else 0
        eval_rows = [train.rows[i] for i in order[:n_eval]]
        train_rows = [train.rows[i] for i in order[n_eval:]]
    if bad:
        log(f"data: skipped {len(bad)} bad rows (skip_bad_rows=true); first: {bad[0]}")
    if cfg.system_prompt is not None:  # as in SFT: the configured system turn where a row has none
        from training.data.processor import with_system

        for r in train_rows + eval_rows:
            r["prompt"] = with_system(r["prompt"], cfg.system_prompt)
    return train_rows, eval_rows, bad


def train_dpo(cfg, *, log=print) -> Path:
    from datasets import Dataset
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback
    from trl import DPOConfig, DPOTrainer

    from training import peft_setup
    from training.callbacks import MetricsCallback, QuietProgress
    from training.data.dataset import file_sha256
    from training.distributed import runtime as dist
    from training.tracking import ConsoleLogger, FanOut, JsonlLogger
    from training.trainer import (
        _final_train_loss,
        _resume_point,
        after_publish,
        base_and_tokenizer,
        stop_tokens,
        trainer_arguments,
    )

    if not dist.is_main():  # distributed: progress and logs come from rank 0 only
        log = lambda msg: None  # noqa: E731
    t_start = time.time()
    base_dir, tokenizer = base_and_tokenizer(cfg, log)

    train_rows, eval_rows, bad = split(cfg, log)
    files = [cfg.train_file] + ([cfg.eval_file] if cfg.eval_file else [])
    data_fp = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]
    log(f"data: {len(train_rows)} train / {len(eval_rows)} eval preference pairs, {len(bad)} bad rows skipped")

    run_dir = cfg.checkpoint_dir
    decided, resume_from = dist.resume_from_launcher()  # distributed: chosen once, before the ranks started
    if not decided:
        resume_from = _resume_point(cfg, run_dir, log)
    set_seed(cfg.seed)
    model = peft_setup.load_base(cfg, base_dir)

    steps_per_epoch = math.ceil(len(train_rows) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)
    loggers = [ConsoleLogger(total_steps), JsonlLogger(run_dir / "metrics.jsonl")] if dist.is_main() else []
    if cfg.report_to == "swanlab" and dist.is_main():
        from training.tracking import SwanLabLogger

        loggers.append(SwanLabLogger(run_dir / "swanlog", cfg.swanlab_project, cfg.task))
    tracker = FanOut(*loggers)
    tracker.log_config(cfg.model_dump(mode="json") | {"train_rows": len(train_rows)})

    args = dist.resolved(DPOConfig(  # distributed: the same DeepSpeed/FSDP/backend settings as SFT
        **dist.training_arguments(cfg, model, trainer_arguments(cfg, run_dir, total_steps, has_eval=bool(eval_rows))),
        beta=cfg.beta,
        loss_type=[cfg.dpo_loss],
        label_smoothing=cfg.label_smoothing,
        max_length=cfg.max_length,
    ))
    trainer = DPOTrainer(
        model=model, args=args, processing_class=tokenizer, peft_config=peft_setup.peft_config(cfg),
        train_dataset=Dataset.from_list(train_rows), eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        callbacks=[MetricsCallback(tracker)],
    )
    dist.cpu_fsdp(trainer)
    dist.report_shards(trainer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)
    model = trainer.model
    trainable, total = model.get_nb_trainable_parameters()
    log(f"model: dpo {cfg.method} r={cfg.rank} alpha={cfg.alpha} beta={cfg.beta} loss={cfg.dpo_loss} on "
        f"{cfg.base_model}: {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable; reference = base")

    stops = stop_tokens(tokenizer, base_dir)
    stop_ids = tokenizer.convert_tokens_to_ids(stops)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        history = trainer.state.log_history
        metrics = Metrics(train_loss=_final_train_loss(history, result.training_loss))
        last = next((h for h in reversed(history) if "rewards/margins" in h), {})
        for src, dst in REWARD_METRICS.items():
            if src in last:
                setattr(metrics, dst, float(last[src]))
        if eval_rows:
            ev = trainer.evaluate()
            metrics.eval_loss = ev["eval_loss"]
            for src, dst in REWARD_METRICS.items():
                if f"eval_{src}" in ev:
                    setattr(metrics, f"eval_{dst}", float(ev[f"eval_{src}"]))
            tracker.log({"eval_loss": metrics.eval_loss}, trainer.state.global_step)
        metrics.train_runtime_s = round(time.time() - t_start, 1)
        metrics.steps = trainer.state.global_step
        if cfg.eval_forgetting:
            from training.evaluate import forgetting_after_training

            metrics.forgetting = forgetting_after_training(cfg, model, tokenizer, stop_ids, log=log)
    finally:
        tracker.close()

    # The stage lives in train_config; a manifest schema that has its own `stage` field gets it there too.
    extra = {"stage": "dpo"} if "stage" in Manifest.model_fields else {}
    manifest = Manifest(
        task=cfg.task,
        base_model=BaseModelRef(id=cfg.base_model, path=str(base_dir), sha256=weights_sha256(base_dir)),
        **peft_setup.manifest_fields(cfg),  # method, artifact, serve_with, rank, alpha, target_modules
        chat_template=tokenizer.chat_template, system_prompt=cfg.system_prompt, stop_tokens=stops,
        max_context=int(getattr(model.config, "max_position_embeddings", cfg.max_length)),
        data_fingerprint=data_fp, metrics=metrics, train_config=cfg.model_dump(mode="json"), **extra,
    )
    dist.save_adapter(trainer, cfg.adapter_dir, model.save_pretrained, manifest.write)  # ZeRO-3/FSDP shards gathered
    log(f"adapter: wrote {cfg.adapter_dir} (dpo loss {metrics.train_loss:.4f}, reward margin "
        f"{getattr(metrics, 'reward_margin', float('nan')):.4f}, reward accuracy "
        f"{getattr(metrics, 'reward_accuracy', float('nan')):.2f})")

    prompts = [r["prompt"] for r in (eval_rows or train_rows)[: cfg.generation_samples]]
    return after_publish(cfg, trainer, model, tokenizer, prompts, stop_ids, log)
