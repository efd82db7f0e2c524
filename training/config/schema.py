"""TrainConfig: the sections of sections.py combined, plus the rules that span them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import model_validator

from kernel.configfile import rule
from kernel.manifest import FULL_METHODS, LORA_METHODS, PROMPT_METHODS
from kernel.paths import DEFAULT_ADAPTERS_DIR, DEFAULT_RUNS_DIR
from training.config.sections import (
    OPTION_METHODS,
    DataSection,
    DistributedSection,
    DpoSection,
    LoraSection,
    MethodOptionsSection,
    MethodSection,
    MixSection,
    OptimisationSection,
    TaskSection,
    TrackingSection,
)


# pydantic lists the fields of the last base first: the bases are in reverse so keys read in topic order.
class TrainConfig(MixSection, DpoSection, DistributedSection, TrackingSection, OptimisationSection,
                  MethodOptionsSection, LoraSection, MethodSection, DataSection, TaskSection):
    """Every `train` key, flat; each topic's keys and own rules are in its section."""

    @model_validator(mode="after")
    def _packing_by_default_for_sft(self):
        # Sales-style chats fill under 2/3 of a padded batch; packed rows fill 95% (docs/training-speed.md).
        if self.packing is None:  # prompt methods add virtual tokens or prefixes that a packed row would share
            self.packing = self.stage == "sft" and self.method not in PROMPT_METHODS
        return self

    @rule
    def packing_not_with_prompt_methods(self):
        if self.packing and self.method in PROMPT_METHODS:
            return (f"packing does not apply to method {self.method}: its virtual tokens or prefixes would be "
                    "shared by every conversation in a packed row; remove packing")

    # -- where the rows come from
    @rule
    def train_file_or_datasets(self):
        if (self.train_file is None) == (self.datasets is None):
            return ("give exactly one of train_file or datasets (a mix of sources)"
                    + ("" if self.train_file is None else ", not both"))

    @rule
    def dedup_only_for_train_file(self):
        if (self.dedup_exact or self.dedup_near) and self.datasets is not None:
            return "dedup_exact/dedup_near apply to train_file; a datasets mix repeats rows on purpose: remove them"

    @rule
    def pt_reads_train_file(self):
        if self.stage == "pt" and self.datasets is not None:
            return "stage pt reads raw text from train_file, not a datasets mix"

    # -- stage dpo
    @rule
    def dpo_keys_need_stage_dpo(self):
        dpo_keys = {"beta", "dpo_loss", "label_smoothing"} & self.model_fields_set
        if self.stage != "dpo" and dpo_keys:
            return f"{sorted(dpo_keys)[0]} only applies to stage dpo"

    @rule
    def dpo_reads_one_preference_file(self):
        if self.stage == "dpo" and self.datasets is not None:
            return ("stage dpo reads one preference file: set train_file "
                    "(e.g. the output of `guardtune badcases export`), not datasets")

    @rule
    def dpo_trains_lora_or_dora(self):
        # qlora: TRL casts 4-bit adapters to bf16, ~12x slower on CPU; the others are not built for it here.
        if self.stage == "dpo" and self.method not in ("lora", "dora"):
            return f"stage dpo supports method lora or dora, not {self.method}"

    @rule
    def dpo_scores_only_replies(self):
        if self.stage == "dpo" and (self.train_on_prompt or self.mask_history):
            return ("train_on_prompt and mask_history do not apply to stage dpo: "
                    "DPO scores only the chosen and rejected replies")

    @rule
    def label_smoothing_needs_robust_loss(self):
        if self.stage == "dpo" and self.label_smoothing and self.dpo_loss != "robust":
            return "label_smoothing applies to dpo_loss robust only: set dpo_loss: robust or remove it"

    # -- method options
    @rule
    def options_match_the_method(self):
        # LoRA keys have defaults everywhere and are ignored outside the LoRA family; these options are
        # only ever set on purpose. A default value is fine anywhere, so a dumped config reads back.
        fields = type(self).model_fields
        return [f"{key} only applies to method {' or '.join(methods)}, not {self.method}"
                for key, methods in OPTION_METHODS.items()
                if key in self.model_fields_set and getattr(self, key) != fields[key].default
                and self.method not in methods]

    @rule
    def freeze_names_what_to_train(self):
        if self.method == "freeze" and self.trainable_layers is None and not self.trainable_modules:
            return ("method freeze needs what to train: trainable_layers: N (the last N layers) "
                    "and/or trainable_modules: [lm_head, model.norm]")

    @rule
    def encoder_hidden_size_needs_prefix_projection(self):
        if (self.encoder_hidden_size != type(self).model_fields["encoder_hidden_size"].default
                and self.method == "prefix_tuning" and not self.prefix_projection):
            return "encoder_hidden_size only applies to prefix_tuning with prefix_projection: true"

    @rule
    def merge_only_lora_adapters(self):
        if self.merge and self.method not in LORA_METHODS:
            what = ("already writes a full model" if self.method in FULL_METHODS
                    else "has no weights to fold into the base")
            return (f"merge only folds LoRA-family adapters (lora, dora) into the base; method "
                    f"{self.method} {what}: remove merge")

    @rule
    def merge_not_into_quantized_base(self):
        if self.merge and self.quantized:
            return ("merge is refused on a quantized base: train with method lora, or run "
                    "`guardtune export ADAPTER --merge OUT`, which merges into the full-precision base")

    # -- distributed
    @rule
    def qlora_shards_only_with_zero2(self):
        if self.quantized and (self.fsdp or self.deepspeed not in (None, "zero2")):
            return ("method qlora shards only with deepspeed zero2: 4-bit weights cannot be "
                    "partitioned by zero3 or fsdp")

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir or DEFAULT_ADAPTERS_DIR / self.task

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir or DEFAULT_RUNS_DIR / self.task

    def fingerprint(self) -> str:
        """What a checkpoint depends on; length and logging settings may change across a resume."""
        volatile = {"max_steps", "num_epochs", "resume", "report_to", "logging_steps", "eval_steps",
                    "save_steps", "save_total_limit", "generation_samples", "output_dir", "merge", "swanlab_project",
                    "node_rank", "hostfile", "master_addr", "master_port", "launcher", "dry_run"}
        kept = {k: v for k, v in self.model_dump(mode="json").items() if k not in volatile}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
