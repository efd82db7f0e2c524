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

from guardtune.configfile import explain, read_mapping
from guardtune.errors import GuardtuneError
from guardtune.models import DEFAULT_BASE_MODEL
from guardtune.paths import DEFAULT_ADAPTERS_DIR, DEFAULT_RUNS_DIR

Method = Literal["lora", "qlora", "dora"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what and from what
    task: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    base_model: str = DEFAULT_BASE_MODEL
    train_file: Path
    eval_file: Path | None = None
    eval_split: float = Field(0.05, ge=0.0, lt=0.5, description="held-out fraction when there is no eval_file")
    skip_bad_rows: bool = False

    # prompt format and masking
    system_prompt: str | None = Field(None, description="default: the chat template's own")
    max_length: int = Field(1024, ge=16)
    train_on_prompt: bool = False
    mask_history: bool = False

    # method
    method: Method = "lora"
    quantization: Literal["auto", "none", "nf4"] = Field("auto", description="auto: nf4 for qlora, none otherwise")
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = Field(False, description="also write a merged full model to <output_dir>-merged")

    # optimisation
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1, description="-1: run num_epochs")
    num_epochs: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = True
    seed: int = 42

    # bookkeeping
    output_dir: Path | None = Field(None, description="final adapter; default adapters/<task>")
    run_dir: Path | None = Field(None, description="checkpoints and logs; default runs/<task>")
    logging_steps: int = Field(1, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    resume: Literal["auto", "never"] = "auto"
    report_to: Literal["swanlab", "none"] = "swanlab"
    swanlab_project: str = "guardtune"
    generation_samples: int = Field(3, ge=0, description="replies printed base vs adapter after training")

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
                    "save_steps", "save_total_limit", "generation_samples", "output_dir", "merge", "swanlab_project"}
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
    raw.update(parse_overrides(overrides or []))
    return validate(raw, source=str(path) if path else "overrides")


def validate(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise GuardtuneError(f"{source}: {explain(exc.errors()[0], TrainConfig.model_fields)}") from None
