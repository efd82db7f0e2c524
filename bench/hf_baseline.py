"""The anchor `train` is measured against: a plain Hugging Face Trainer + PEFT LoRA script.

It does what LLaMA-Factory does inside for LoRA SFT, and nothing more: the model in fp32, LoRA on
every linear layer, batches padded to the longest row (a multiple of 8) by DataCollatorForSeq2Seq,
gradient checkpointing (reentrant, with input gradients on, as LLaMA-Factory sets it), the stock
AdamW and the full-vocabulary loss. Rows come with the same label masks as `train`'s, so only
the training differs. Prints one RESULT line of JSON; bench/train_bench.py runs it.

    python bench/hf_baseline.py DATA.jsonl OUT_DIR --rows 200 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from kernel.models import resolve_base_model  # noqa: E402
from training.data.processor import IGNORE, MaskOptions, tokenize_batch  # noqa: E402
from training.data.readers import read_jsonl  # noqa: E402


class StepClock(TrainerCallback):
    """Seconds per optimizer step and the loss, as `train`'s metrics.jsonl records them."""

    def __init__(self):
        self.t = 0.0
        self.steps: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.t = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            now = time.time()
            self.steps.append({"step": state.global_step, "loss": float(logs["loss"]), "s_per_step": now - self.t})
            self.t = now


def rows(path: Path, n: int, tokenizer, max_length: int) -> Dataset:
    convs = read_jsonl(path).conversations[:n]
    examples = [e for e in tokenize_batch(tokenizer, convs, MaskOptions(max_length=max_length)) if e is not None]
    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    base = resolve_base_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = rows(a.data, a.rows, tokenizer, a.max_length)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(a.out), per_device_train_batch_size=4, learning_rate=2e-4, lr_scheduler_type="cosine",
        max_steps=a.steps, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True},
        logging_steps=1, save_strategy="no", report_to="none", seed=a.seed, data_seed=a.seed,
        remove_unused_columns=False, disable_tqdm=True)
    clock = StepClock()
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE, pad_to_multiple_of=8)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[clock]).train()
    model.save_pretrained(a.out / "adapter")
    print("RESULT", json.dumps({"steps": clock.steps, "rows": len(data), "sequences": len(data),
                                "tokens": int(sum(len(r) for r in data["input_ids"])),
                                "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)


if __name__ == "__main__":
    main()
