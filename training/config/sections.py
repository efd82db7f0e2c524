"""The `train` config's keys by topic, one pydantic model per topic.

TrainConfig (schema.py) inherits them all, so keys stay flat: `rank: 8` in YAML, `cfg.rank` in code.
A section's rules read only its own keys, so a section also stands alone (`guardtune estimate` reuses
some); rules across topics live in TrainConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kernel.configfile import RuleChecked, rule
from kernel.manifest import Method
from kernel.models import DEFAULT_BASE_MODEL


class Section(RuleChecked):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskSection(Section):
    """What is trained, from what."""
    task: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="the task this adapter serves; names adapters/<task> and runs/<task>")
    base_model: str = Field(DEFAULT_BASE_MODEL, description="alias of a packaged model, a local HF directory or a hub id")


class DataSection(Section):
    """The rows, the objective they train (stage), the prompt format and masking, and data cleaning."""
    train_file: Path | None = Field(None, description="JSONL data (or `datasets:`, a mix of several sources)")
    eval_file: Path | None = Field(None, description="held-out JSONL; default: eval_split of the training rows")
    eval_split: float = Field(0.05, ge=0.0, lt=0.5, description="held-out fraction when there is no eval_file")
    skip_bad_rows: bool = Field(False, description="count and skip malformed rows instead of stopping at the first")

    stage: Literal["sft", "pt", "dpo"] = Field("sft", description="sft: chats; pt: raw text (continued pretraining); dpo: preference pairs")

    system_prompt: str | None = Field(None, description="default: the chat template's own")
    max_length: int = Field(1024, ge=16, description="tokens per example; longer chats lose their oldest exchanges")
    train_on_prompt: bool = Field(False, description="train on every token, not only the assistant replies")
    mask_history: bool = Field(False, description="train only on the last assistant reply of each chat")

    # training/data/: pretraining blocks, packing, cleaning, sharded tokenisation
    block_size: int | None = Field(None, ge=16, description="pt: tokens per training block; default max_length")
    packing: bool | None = Field(None, description="sft: pack short conversations into rows of up to max_length, "
                                                   "each attending only to itself (default: on for sft)")
    group_by_length: bool = Field(False, description="sft without packing: batch rows of similar length together "
                                                     "(less padding, less random batches)")
    dedup_exact: bool = Field(False, description="drop rows whose normalised text repeats an earlier row")
    dedup_near: float | None = Field(None, gt=0.0, le=1.0, description="drop rows this Jaccard-similar (char "
                                                                        "5-grams, MinHash) to an earlier row")
    filler_words: list[str] = Field(default_factory=list, description="strip these from turns, e.g. [嗯嗯, um]")
    banned_phrases: list[str] = Field(default_factory=list, description="drop conversations whose assistant "
                                                                         "turns (pt: text) contain one")
    shard_rows: int = Field(50_000, ge=1, description="rows tokenised per cached on-disk shard; bounds memory")

    @rule
    def mask_history_or_train_on_prompt(self):
        return _at_most_one(self, "mask_history", "train_on_prompt")

    @rule
    def block_size_only_for_pt(self):
        if self.block_size is not None and self.stage != "pt":
            return f"block_size only applies to stage pt (raw text), not {self.stage}: remove it or set stage: pt"

    @rule
    def packing_only_for_sft(self):
        if self.packing and self.stage != "sft":
            return (f"packing only applies to stage sft; stage {self.stage} "
                    + ("always packs text into block_size blocks" if self.stage == "pt" else "does not pack")
                    + ": remove packing")

    @rule
    def group_by_length_only_unpacked(self):
        if self.group_by_length and (self.packing or self.stage != "sft"):
            return "group_by_length applies to unpacked sft rows: set packing: false, or remove group_by_length"

    @rule
    def pt_trains_every_token(self):
        if self.stage == "pt" and (self.train_on_prompt or self.mask_history):
            return "train_on_prompt and mask_history do not apply to stage pt: raw text trains every token"

    @rule
    def no_empty_cleaning_strings(self):
        if any(not w.strip() for w in self.filler_words + self.banned_phrases):
            return "filler_words and banned_phrases must not contain empty strings: remove the blank entries"


class MethodSection(Section):
    """What kind of weights train, and whether the base is quantized for it."""
    method: Method = Field("lora", description="lora qlora dora: LoRA adapter; full freeze: full model; prompt_tuning "
                                              "p_tuning prefix_tuning llama_adapter: adapter for engine: transformers")
    quantization: Literal["auto", "none", "nf4"] = Field("auto", description="auto: nf4 for qlora, none otherwise")

    @rule
    def qlora_needs_4bit_quantization(self):
        if self.method == "qlora" and self.quantization == "none":
            return "method qlora requires 4-bit quantization: set quantization: nf4 (or auto)"

    @rule
    def nf4_only_with_qlora(self):
        if self.method != "qlora" and self.quantization == "nf4":
            return f"quantization nf4 is only used with method qlora, not {self.method}: set method: qlora " \
                   "or quantization: auto"

    @property
    def quantized(self) -> bool:
        return self.method == "qlora" and self.quantization in ("auto", "nf4")


class LoraSection(Section):
    """LoRA-family keys: they have defaults everywhere and are ignored outside lora, qlora and dora."""
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (lora, qlora, dora)")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (alpha / rank)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


# Which methods each option of MethodOptionsSection applies to; TrainConfig refuses one set for another.
OPTION_METHODS = {
    "trainable_layers": ("freeze",), "trainable_modules": ("freeze",),
    "num_virtual_tokens": ("prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter"),
    "prompt_init_text": ("prompt_tuning",), "p_tuning_encoder": ("p_tuning",),
    "encoder_hidden_size": ("p_tuning", "prefix_tuning"), "prefix_projection": ("prefix_tuning",),
    "adapter_layers": ("llama_adapter",),
}


class MethodOptionsSection(Section):
    """Options of particular methods (each description names them), and merging the result."""
    merge: bool = Field(False, description="also write a merged full model to <output_dir>-merged")
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


class OptimisationSection(Section):
    """The optimizer, the schedule, the batch and how memory is traded for speed."""
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(4, ge=1, description="examples per device per step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_steps: int = Field(-1, ge=-1, description="-1: run num_epochs")
    num_epochs: float = Field(1.0, gt=0, description="used when max_steps is -1")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps with a linear warm-up")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    gradient_checkpointing: bool = Field(True, description="recompute activations in backward: less memory, ~30% slower")
    host_memory: Literal["auto", "bounded", "fast"] = Field(
        "auto", description="CPU only. bounded: freed tensors of 1 MiB and more go back to the OS at once, so peak "
                            "RSS tracks `guardtune estimate`; fast: glibc keeps them for reuse (quicker steps, up to "
                            "1.24x the peak); auto: fast unless the estimate says memory is tight")
    liger_kernel: bool = Field(True, description="CUDA: Liger Kernel's fused RMSNorm, RoPE, SwiGLU and linear "
                                                 "cross-entropy, when the liger-kernel package is installed")
    seed: int = Field(42, description="model init, data order and sampling")


class TrackingSection(Section):
    """Where the results go, checkpoints and resume, and progress reporting."""
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


DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")  # training/distributed/ds_<name>.json


class DistributedSection(Section):
    """Launched through torchrun (or the deepspeed launcher); see training/distributed/."""
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

    @rule
    def deepspeed_or_fsdp(self):
        return _at_most_one(self, "deepspeed", "fsdp")

    @rule
    def deepspeed_preset_or_json(self):
        if self.deepspeed and self.deepspeed not in DEEPSPEED_PRESETS and not self.deepspeed.endswith(".json"):
            return f"deepspeed '{self.deepspeed}': use one of {', '.join(DEEPSPEED_PRESETS)} or a .json path"

    @rule
    def node_rank_below_nnodes(self):
        if self.node_rank >= self.nnodes and self.hostfile is None:  # a hostfile sets the node count
            return f"node_rank {self.node_rank} must be below nnodes {self.nnodes}: count nodes from 0"

    @property
    def distributed(self) -> bool:
        """Runs under a launcher: several processes, or a sharding engine that needs a process group."""
        return bool(self.deepspeed or self.fsdp or self.nproc > 1 or self.nnodes > 1 or self.hostfile)


class DpoSection(Section):
    """Preference training (stage dpo)."""
    beta: float = Field(0.1, gt=0, description="dpo: strength of the pull towards the reference (base) model")
    dpo_loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="dpo: TRL loss_type")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo: assumed share of flipped preferences (robust)")


class ReplaySpec(BaseModel):
    """Self-distillation: the base model's own greedy replies to a prompt list, cached by content."""
    model_config = ConfigDict(extra="forbid")
    prompts: Path = Field(description="text file, one prompt per line")
    max_new_tokens: int = Field(96, ge=1, le=2048)
    batch_size: int = Field(8, ge=1)


class DataSource(RuleChecked):
    """One entry of `datasets:`: a JSONL file or a replay set, and its share of the mix."""
    model_config = ConfigDict(extra="forbid")
    path: Path | None = None
    replay: ReplaySpec | None = None
    ratio: float = Field(1.0, gt=0)

    @rule
    def path_or_replay(self):
        if (self.path is None) == (self.replay is None):
            return "each datasets entry needs exactly one of path or replay: {path: rows.jsonl} or " \
                   "{replay: {prompts: prompts.txt}}"


class MixSection(Section):
    """A mix of sources instead of train_file, and the forgetting check after training."""
    datasets: list[DataSource] | None = Field(None, description="a mix instead of train_file: [{path: a.jsonl, ratio: 1}, "
                                                                "{replay: {prompts: p.txt}, ratio: 5}]")
    mix_size: int | None = Field(None, ge=1, description="rows in the mix; default: all rows of the sources together")
    eval_forgetting: bool = Field(False, description="after training, compare base and adapter on a general set")
    forgetting_file: Path | None = Field(None, description="general set for eval_forgetting; default examples/data/general_eval.jsonl")
    forgetting_rows: int = Field(30, ge=1, description="rows of the general set scored by eval_forgetting")

    @rule
    def datasets_not_empty(self):
        if self.datasets is not None and not self.datasets:
            return "datasets is empty: list at least one source, e.g. [{path: data.jsonl, ratio: 1}]"

    @rule
    def mix_size_needs_datasets(self):
        if self.mix_size is not None and self.datasets is None:
            return "mix_size only applies to datasets (a mix of sources): remove it or give datasets"


def _at_most_one(section: BaseModel, *keys: str) -> str | None:
    """The message when more than one of `keys` is set; they exclude each other."""
    if sum(bool(getattr(section, k)) for k in keys) > 1:
        return f"{' and '.join(keys)} exclude each other: set only one"
    return None
