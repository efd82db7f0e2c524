"""`stage: dpo`: a LoRA/DoRA adapter trained with TRL's DPOTrainer on preference pairs
(training/data/preferences.py).

The reference model is the base itself: TRL disables the adapter to score it, so no second copy
of the weights is held. The adapter is published like an SFT one (manifest, atomic directory),
with TRL's reward margin and accuracy in its metrics.
"""

from __future__ import annotations

from kernel.manifest import Metrics
from training import peft_setup
from training.config import TrainConfig
from training.data.preferences import split_preferences
from training.run import Run, StageData

# TRL metric name -> manifest metric name
REWARD_METRICS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
                  "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"}


def data(cfg: TrainConfig, tokenizer, log) -> StageData:
    pairs = split_preferences(cfg, log)
    log(f"data: {len(pairs.train)} train / {len(pairs.eval)} eval preference pairs, "
        f"{len(pairs.bad_rows)} bad rows skipped")
    return StageData(pairs.train, pairs.eval or None, len(pairs.train), pairs.fingerprint)


def trainer(run: Run, data: StageData, callbacks: list) -> tuple[object, int]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = run.cfg
    model = peft_setup.load_base(cfg, run.base_dir)  # TRL wraps it with the adapter
    args = run.arguments(DPOConfig, model, has_eval=data.eval is not None, beta=cfg.beta, loss_type=[cfg.dpo_loss],
                         label_smoothing=cfg.label_smoothing, max_length=cfg.max_length)
    trainer = DPOTrainer(
        model=model, args=args, processing_class=run.tokenizer, peft_config=peft_setup.peft_config(cfg),
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None, callbacks=callbacks,
    )
    trainable, total = trainer.model.get_nb_trainable_parameters()
    run.log(f"model: dpo {cfg.method} r={cfg.rank} alpha={cfg.alpha} beta={cfg.beta} loss={cfg.dpo_loss} on "
            f"{cfg.base_model}: {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters trainable; reference = base")
    return trainer, trainable


def metrics(history: list[dict], evaluated: dict | None) -> dict:
    """TRL's reward margin and accuracy: the last logged training values, and eval's."""
    last = next((h for h in reversed(history) if "rewards/margins" in h), {})
    out = {dst: float(last[src]) for src, dst in REWARD_METRICS.items() if src in last}
    for src, dst in REWARD_METRICS.items():
        if evaluated and f"eval_{src}" in evaluated:
            out[f"eval_{dst}"] = float(evaluated[f"eval_{src}"])
    return out


def summary(m: Metrics) -> str:
    return (f"dpo loss {m.train_loss:.4f}, reward margin {getattr(m, 'reward_margin', float('nan')):.4f}, "
            f"reward accuracy {getattr(m, 'reward_accuracy', float('nan')):.2f}")


def samples(cfg: TrainConfig, data: StageData) -> list:
    return [r["prompt"] for r in (data.eval or data.train)[: cfg.generation_samples]]
