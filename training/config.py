"""The `train` config: a YAML file plus `key=value` overrides, validated by one pydantic schema.

Validators turn the usual mistakes (a misspelt key, qlora without 4-bit, merging into a quantized
base) into a one-line error that says what to change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernel.configfile import explain, read_mapping
from kernel.errors import GuardtuneError
from kernel.manifest import FULL_METHODS, LORA_METHODS, Method
from kernel.models import DEFAULT_BASE_MODEL
from kernel.paths import DEFAULT_ADAPTERS_DIR, DEFAULT_RUNS_DIR


class ReplaySpec(BaseModel):
    """Self-distillation: the base model's own greedy replies to a prompt list, cached by content."""
    model_config = ConfigDict(extra="forbid")
    prompts: Path = Field(description="text file, one prompt per line")
    max_new_tokens: int = Field(96, ge=1, le=2048)
    batch_size: int = Field(8, ge=1)


class DataSource(BaseModel):
    """One entry of `datasets:`: a JSONL file or a replay set, and its share of the mix."""
    model_config = ConfigDict(extra="forbid")
    path: Path | None = None
    replay: ReplaySpec | None = None
    ratio: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _one(self) -> "DataSource":
        if (self.path is None) == (self.replay is None):
            raise ValueError("each datasets entry needs exactly one of path or replay")
        return self


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what and from what
    task: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="the task this adapter serves; names adapters/<task> and runs/<task>")
    base_model: str = Field(DEFAULT_BASE_MODEL, description="alias of a packaged model, a local HF directory or a hub id")
    train_file: Path | None = Field(None, description="JSONL data (or `datasets:`, a mix of several sources)")
    eval_file: Path | None = Field(None, description="held-out JSONL; default: eval_split of the training rows")
    eval_split: float = Field(0.05, ge=0.0, lt=0.5, description="held-out fraction when there is no eval_file")
    skip_bad_rows: bool = Field(False, description="count and skip malformed rows instead of stopping at the first")

    # stage: what kind of data trains what objective
    stage: Literal["sft", "pt", "dpo"] = Field("sft", description="sft: chats; pt: raw text (continued pretraining); dpo: preference pairs")

    # prompt format and masking
    system_prompt: str | None = Field(None, description="default: the chat template's own")
    max_length: int = Field(1024, ge=16, description="tokens per example; longer chats lose their oldest exchanges")
    train_on_prompt: bool = Field(False, description="train on every token, not only the assistant replies")
    mask_history: bool = Field(False, description="train only on the last assistant reply of each chat")

    # data options (training/data/): pretraining blocks, packing, cleaning, sharded tokenisation
    block_size: int | None = Field(None, ge=16, description="pt: tokens per training block; default max_length")
    packing: bool = Field(False, description="sft: pack short conversations into rows of up to max_length")
    dedup_exact: bool = Field(False, description="drop rows whose normalised text repeats an earlier row")
    dedup_near: float | None = Field(None, gt=0.0, le=1.0, description="drop rows this Jaccard-similar (char "
                                                                        "5-grams, MinHash) to an earlier row")
    filler_words: list[str] = Field(default_factory=list, description="strip these from turns, e.g. [嗯嗯, um]")
    banned_phrases: list[str] = Field(default_factory=list, description="drop conversations whose assistant "
                                                                         "turns (pt: text) contain one")
    shard_rows: int = Field(50_000, ge=1, description="rows tokenised per cached on-disk shard; bounds memory")

    # method
    method: Method = Field("lora", description="lora qlora dora: LoRA adapter; full freeze: full model; prompt_tuning "
                                              "p_tuning prefix_tuning llama_adapter: adapter for engine: transformers")
    quantization: Literal["auto", "none", "nf4"] = Field("auto", description="auto: nf4 for qlora, none otherwise")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (lora, qlora, dora)")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (alpha / rank)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = Field(False, description="also write a merged full model to <output_dir>-merged")

    # method options (each applies to the methods named in its description; set for another method, it is an error)
    trainable_layers: int | None = Field(None, ge=1, description="freeze: train only the last N decoder layers")
    trainable_modules: list[str] | None = Field(
        None, min_length=1, description="freeze: also train these named modules, e.g. [lm_head, model.norm]")
    num_virtual_tokens: int = Field(
        16, ge=1, le=512, description="prompt_tuning, p_tuning, prefix_tuning: learned tokens; llama_adapter: adapter_len")
    prompt_init_text: str | None = Field(
        None, min_length=1, description="prompt_tuning: start the virtual tokens from this text (default: random vocabulary tokens)")
    p_tuning_encoder: Literal["mlp", "lstm"] = Field("mlp", description="p_tuning: the prompt encoder")
    encoder_hidden_size: int = Field(
        256, ge=1, description="p_tuning, and prefix_tuning with prefix_projection: the encoder's hidden size")
    prefix_projection: bool = Field(False, description="prefix_tuning: produce the prefixes through an MLP")
    adapter_layers: int | None = Field(
        None, ge=1, description="llama_adapter: top layers that get adaption prompts (default: all)")

    # optimisation
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(4, ge=1, description="examples per device per step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_steps: int = Field(-1, ge=-1, description="-1: run num_epochs")
    num_epochs: float = Field(1.0, gt=0, description="used when max_steps is -1")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps with a linear warm-up")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    gradient_checkpointing: bool = Field(True, description="recompute activations in backward: less memory, ~30% slower")
    host_memory: Literal["bounded", "fast"] = Field(
        "bounded", description="CPU only. bounded: freed tensors of 1 MiB and more go back to the OS at once, so peak "
                               "RSS tracks `guardtune estimate`; fast: glibc keeps them for reuse (quicker steps, higher peak)")
    seed: int = Field(42, description="model init, data order and sampling")

    # bookkeeping
    output_dir: Path | None = Field(None, description="final adapter; default adapters/<task>")
    run_dir: Path | None = Field(None, description="checkpoints and logs; default runs/<task>")
    logging_steps: int = Field(1, ge=1, description="a progress line every N steps")
    eval_steps: int = Field(50, ge=1, description="eval loss every N steps")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (for resume)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept in run_dir")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the last complete checkpoint")
    report_to: Literal["swanlab", "none"] = Field("swanlab", description="SwanLab local mode, or none")
    swanlab_project: str = Field("guardtune", description="SwanLab project name")
    generation_samples: int = Field(3, ge=0, description="replies printed base vs adapter after training")

    # distributed: launched through torchrun (or the deepspeed launcher); see training/distributed/
    deepspeed: str | None = Field(None, description="zero2, zero3, zero3_offload or a DeepSpeed JSON path")
    fsdp: bool = Field(False, description="PyTorch FSDP: transformer-layer wrap, activation checkpointing")
    nproc: int = Field(1, ge=1, le=64, description="processes per node (GPUs per node on CUDA)")
    nnodes: int = Field(1, ge=1, le=1024, description="nodes; default: the hosts in hostfile")
    node_rank: int = Field(0, ge=0, description="this node's rank for a torchrun multi-node run")
    hostfile: Path | None = Field(None, description="DeepSpeed hostfile: one `IP slots=N` line per node")
    master_addr: str = Field("127.0.0.1", description="rank 0's address (an IP); default: first hostfile host")
    master_port: int = Field(29500, ge=1024, le=65535)
    launcher: Literal["torchrun", "deepspeed"] = Field("torchrun", description="multi-node: torchrun on every node, "
                                                                          "or deepspeed from the first (ssh/pdsh)")
    dry_run: bool = Field(False, description="print the launch command per node and validate, without training")

    # dpo / mixing / forgetting
    beta: float = Field(0.1, gt=0, description="dpo: strength of the pull towards the reference (base) model")
    dpo_loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="dpo: TRL loss_type")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo: assumed share of flipped preferences (robust)")
    datasets: list[DataSource] | None = Field(None, description="a mix instead of train_file: [{path: a.jsonl, ratio: 1}, "
                                                                "{replay: {prompts: p.txt}, ratio: 5}]")
    mix_size: int | None = Field(None, ge=1, description="rows in the mix; default: all rows of the sources together")
    eval_forgetting: bool = Field(False, description="after training, compare base and adapter on a general set")
    forgetting_file: Path | None = Field(None, description="general set for eval_forgetting; default examples/data/general_eval.jsonl")
    forgetting_rows: int = Field(30, ge=1, description="rows of the general set scored by eval_forgetting")

    @model_validator(mode="after")
    def _check_dpo_mix(self) -> "TrainConfig":
        if (self.train_file is None) == (self.datasets is None):
            raise ValueError("give exactly one of train_file or datasets (a mix of sources)"
                             + ("" if self.train_file is None else ", not both"))
        if self.datasets is not None and not self.datasets:
            raise ValueError("datasets is empty: list at least one source, e.g. [{path: data.jsonl, ratio: 1}]")
        if self.mix_size is not None and self.datasets is None:
            raise ValueError("mix_size only applies to datasets (a mix of sources)")
        dpo_keys = {"beta", "dpo_loss", "label_smoothing"} & self.model_fields_set
        if self.stage != "dpo" and dpo_keys:
            raise ValueError(f"{sorted(dpo_keys)[0]} only applies to stage dpo")
        if self.stage == "dpo":
            if self.datasets is not None:
                raise ValueError("stage dpo reads one preference file: set train_file "
                                 "(e.g. the output of `guardtune badcases export`), not datasets")
            if self.method not in ("lora", "dora"):
                # qlora: TRL casts 4-bit adapters to bf16, ~12x slower on CPU; the others are not built for it here.
                raise ValueError(f"stage dpo supports method lora or dora, not {self.method}")
            if self.train_on_prompt or self.mask_history:
                raise ValueError("train_on_prompt and mask_history do not apply to stage dpo: "
                                 "DPO scores only the chosen and rejected replies")
            if self.label_smoothing and self.dpo_loss != "robust":
                raise ValueError("label_smoothing applies to dpo_loss robust only")
        return self

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.method == "qlora" and self.quantization == "none":
            raise ValueError("method qlora requires 4-bit quantization: set quantization: nf4 (or auto)")
        if self.method != "qlora" and self.quantization == "nf4":
            raise ValueError(f"quantization nf4 is only used with method qlora, not {self.method}")
        if self.merge and self.quantized:
            raise ValueError("merge is refused on a quantized base: train with method lora, or run "
                             "`guardtune export ADAPTER --merge OUT`, which merges into the full-precision base")
        if self.mask_history and self.train_on_prompt:
            raise ValueError("mask_history and train_on_prompt contradict each other: pick one")
        return self

    @model_validator(mode="after")
    def _check_method_options(self) -> "TrainConfig":
        # LoRA keys (rank, alpha, ...) have defaults everywhere and are ignored outside the LoRA family;
        # the options below are only ever set on purpose, so one set for the wrong method is a mistake.
        uses = {"trainable_layers": ("freeze",), "trainable_modules": ("freeze",),
                "num_virtual_tokens": ("prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter"),
                "prompt_init_text": ("prompt_tuning",), "p_tuning_encoder": ("p_tuning",),
                "encoder_hidden_size": ("p_tuning", "prefix_tuning"), "prefix_projection": ("prefix_tuning",),
                "adapter_layers": ("llama_adapter",)}
        fields = type(self).model_fields
        for key, methods in uses.items():  # a default value is fine anywhere, so a dumped config reads back
            if key in self.model_fields_set and getattr(self, key) != fields[key].default and self.method not in methods:
                raise ValueError(f"{key} only applies to method {' or '.join(methods)}, not {self.method}")
        if self.method == "freeze" and self.trainable_layers is None and not self.trainable_modules:
            raise ValueError("method freeze needs what to train: trainable_layers: N (the last N layers) "
                             "and/or trainable_modules: [lm_head, model.norm]")
        if (self.encoder_hidden_size != fields["encoder_hidden_size"].default and self.method == "prefix_tuning"
                and not self.prefix_projection):
            raise ValueError("encoder_hidden_size only applies to prefix_tuning with prefix_projection: true")
        if self.merge and self.method not in LORA_METHODS:
            what = ("already writes a full model" if self.method in FULL_METHODS
                    else "has no weights to fold into the base")
            raise ValueError(f"merge only folds LoRA-family adapters (lora, dora) into the base; method "
                             f"{self.method} {what}")
        return self

    @model_validator(mode="after")
    def _check_data_options(self) -> "TrainConfig":
        if self.block_size is not None and self.stage != "pt":
            raise ValueError(f"block_size only applies to stage pt (raw text), not {self.stage}")
        if self.packing and self.stage != "sft":
            raise ValueError(f"packing only applies to stage sft; stage {self.stage} "
                             + ("always packs text into block_size blocks" if self.stage == "pt" else "does not pack"))
        if self.stage == "pt" and (self.train_on_prompt or self.mask_history):
            raise ValueError("train_on_prompt and mask_history do not apply to stage pt: raw text trains every token")
        if (self.dedup_exact or self.dedup_near) and self.datasets is not None:
            raise ValueError("dedup_exact/dedup_near apply to train_file; a datasets mix repeats rows on purpose")
        if self.stage == "pt" and self.datasets is not None:
            raise ValueError("stage pt reads raw text from train_file, not a datasets mix")
        if any(not w.strip() for w in self.filler_words + self.banned_phrases):
            raise ValueError("filler_words and banned_phrases must not contain empty strings")
        return self

    @model_validator(mode="after")
    def _check_distributed(self) -> "TrainConfig":
        presets = ("zero2", "zero3", "zero3_offload")  # training/distributed/ds_<name>.json
        if self.deepspeed and self.fsdp:
            raise ValueError("deepspeed and fsdp are mutually exclusive: pick one")
        if self.deepspeed and self.deepspeed not in presets and not self.deepspeed.endswith(".json"):
            raise ValueError(f"deepspeed '{self.deepspeed}': use one of {', '.join(presets)} or a .json path")
        if self.quantized and (self.fsdp or self.deepspeed not in (None, "zero2")):
            raise ValueError("method qlora shards only with deepspeed zero2: 4-bit weights cannot be "
                             "partitioned by zero3 or fsdp")
        if self.node_rank >= self.nnodes and self.hostfile is None:  # a hostfile sets the node count
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        return self

    @property
    def distributed(self) -> bool:
        """Runs under a launcher: several processes, or a sharding engine that needs a process group."""
        return bool(self.deepspeed or self.fsdp or self.nproc > 1 or self.nnodes > 1 or self.hostfile)

    @property
    def quantized(self) -> bool:
        return self.method == "qlora" and self.quantization in ("auto", "nf4")

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


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML scalars so `max_steps=20` is an int."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise GuardtuneError(f"override '{pair}': expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = _number(value)
    return out


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; a number is meant."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    raw: dict[str, Any] = {}
    base = Path(".")
    if path is not None:
        path = Path(path)
        raw = read_mapping(path, "config")
        base = path.parent
    # Data paths in a config file are relative to that file, so configs travel with their data;
    # paths given as overrides are relative to the working directory, as on any command line.
    for key in ("train_file", "eval_file"):
        if raw.get(key) and not Path(str(raw[key])).is_absolute():
            raw[key] = str(base / str(raw[key]))
    _relative_mix_paths(raw, base)  # dpo / mixing / forgetting
    for key in ("hostfile", "deepspeed"):  # distributed: a hostfile or DeepSpeed JSON beside the config
        value = str(raw.get(key) or "")
        if (key == "hostfile" or value.endswith(".json")) and value and not Path(value).is_absolute():
            raw[key] = str(base / value)
    raw.update(parse_overrides(overrides or []))
    return validate(raw, source=str(path) if path else "overrides")


def _relative_mix_paths(raw: dict[str, Any], base: Path) -> None:
    """`datasets:` paths, replay prompt lists and forgetting_file resolve against the config file too."""
    def fix(holder: Any, key: str) -> None:
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key] \
                and not Path(holder[key]).is_absolute():
            holder[key] = str(base / holder[key])

    fix(raw, "forgetting_file")
    for src in raw.get("datasets") or [] if isinstance(raw.get("datasets"), list) else []:
        fix(src, "path")
        if isinstance(src, dict):
            fix(src.get("replay"), "prompts")


def validate(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise GuardtuneError(f"{source}: {explain(exc.errors()[0], TrainConfig.model_fields)}") from None
