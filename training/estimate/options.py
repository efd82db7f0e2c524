"""What the estimate depends on, read from a `train` config (or none) plus `key=value` overrides.

The method, quantization and LoRA keys are TrainConfig's own sections, rules included; every other
`train` key is accepted and ignored, or mapped (base_model, deepspeed, nproc x nnodes) onto the
estimate's keys, so a train config can be passed as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field

from kernel.configfile import read_mapping, rule, validated
from kernel.errors import GuardtuneError
from kernel.manifest import FULL_METHODS
from training.config import TrainConfig, parse_overrides
from training.config.sections import LoraSection, MethodSection, Section
from training.distributed.ds_config import deepspeed_path
from training.estimate.shapes import LINEARS


class ModelChoice(Section):
    """Which model's shape: no weights are needed."""
    model_config = ConfigDict(protected_namespaces=())
    model: str = Field("smollm2-135m-instruct", description="a preset, a config.json or directory, or a base alias")
    model_config_path: Path | None = Field(None, alias="model_config", description="a config.json (no weights needed)")


class EstimateConfig(LoraSection, MethodSection, ModelChoice):
    """Keys shared with `train` have the same names and meaning."""
    device: Literal["cpu", "cuda"] = Field("cuda", description="cpu: fp32 compute; cuda: bf16 compute")
    precision: Literal["auto", "fp32", "bf16", "fp16", "mixed"] = Field(
        "auto", description="auto: what `train` uses (fp32 on cpu; bf16 base on cuda, full/freeze mixed); "
                            "mixed: 16-bit weights and gradients with fp32 master weights in the optimizer")
    double_quant: bool = Field(True, description="nf4: quantize the block scales too (0.127 bit/param saved)")
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = "adamw"
    trainable_layers: int = Field(2, ge=1, description="freeze: the last N layers train")
    num_virtual_tokens: int = Field(16, ge=1, description="prompt methods: virtual tokens; llama_adapter: adapter_len")
    encoder_hidden_size: int = Field(256, ge=1, description="p_tuning (and projected prefixes): encoder width")
    p_tuning_encoder: Literal["mlp", "lstm"] = "mlp"
    prefix_projection: bool = False
    adapter_layers: int | None = Field(None, ge=1, description="llama_adapter: top layers adapted (default all)")
    batch_size: int = Field(4, ge=1, description="per device (micro-batch)")
    max_length: int = Field(1024, ge=1, description="tokens per sequence (the estimate assumes full-length rows)")
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: bool = True
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage")
    offload: Literal["none", "optimizer", "all"] = Field("none", description="ZeRO CPU offload: optimizer states, "
                                                                             "or also parameters (stage 3)")
    fsdp: bool = Field(False, description="FSDP full shard: like ZeRO-3")
    devices: int = Field(1, ge=1, description="data-parallel devices in all (nproc x nnodes)")
    host_memory: Literal["auto", "bounded", "fast"] = Field(
        "auto", description="cpu: train's host allocator setting; the estimate holds for bounded")

    @rule
    def target_modules_are_decoder_linears(self):
        if isinstance(self.target_modules, list):
            bad = [m for m in self.target_modules if m not in LINEARS]
            if bad:
                return f"target module '{bad[0]}' is not a decoder linear layer: use {', '.join(LINEARS)}"

    @rule
    def offload_all_needs_zero3_or_fsdp(self):
        if self.offload == "all" and self.zero_stage != 3 and not self.fsdp:
            return "offload: all (parameters too) needs zero_stage 3 or fsdp"

    @rule
    def offload_needs_sharding(self):
        if self.offload != "none" and self.zero_stage == 0 and not self.fsdp:
            return "offload needs a ZeRO stage (zero_stage 1-3) or fsdp"

    @rule
    def zero_stage_or_fsdp(self):
        if self.zero_stage and self.fsdp:
            return "pick one of zero_stage and fsdp"

    @property
    def shard_stage(self) -> int:
        """FSDP full shard partitions like ZeRO-3."""
        return 3 if self.fsdp else self.zero_stage

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        if self.device == "cpu":
            return "fp32"
        return "mixed" if self.method in FULL_METHODS else "bf16"


# `train` keys that become estimate keys (_map_distributed, base_model -> model).
MAPPED_TRAIN_KEYS = frozenset({"base_model", "deepspeed", "nproc", "nnodes"})
# The other `train` keys the estimate has no use for: they do not change memory.
IGNORED_TRAIN_KEYS = frozenset(TrainConfig.model_fields) - frozenset(EstimateConfig.model_fields) - MAPPED_TRAIN_KEYS


def load_estimate_config(path: str | Path | None, overrides: list[str], *, model: str | None = None,
                         model_config: str | None = None, device: str | None = None) -> EstimateConfig:
    """A train config (or none) plus key=value overrides, mapped onto the estimate's keys."""
    raw = read_mapping(path, "config") if path else {}
    raw.update(parse_overrides(overrides))
    return estimate_config(raw, str(path or "estimate"), model=model, model_config=model_config, device=device)


def estimate_config(raw: dict, source: str, *, model: str | None = None, model_config: str | None = None,
                    device: str | None = None) -> EstimateConfig:
    """A train config's keys (a mapping) onto the estimate's."""
    raw = dict(raw)
    if "base_model" in raw:
        raw.setdefault("model", raw.pop("base_model"))
    _map_distributed(raw)
    for key in IGNORED_TRAIN_KEYS & set(raw):
        raw.pop(key)
    if model:
        raw["model"] = model
    if model_config:
        raw["model_config"] = model_config
    if device:
        raw["device"] = device
    known = set(EstimateConfig.model_fields) | {"model_config"} | set(TrainConfig.model_fields)
    return validated(EstimateConfig, raw, source, fields=known)


def _map_distributed(raw: dict) -> None:
    """train's `deepspeed` (preset name or JSON), `nproc` x `nnodes` onto zero_stage, offload, devices."""
    ds = raw.pop("deepspeed", None)
    if ds:
        p = deepspeed_path(str(ds))
        if not p.is_file():
            raise GuardtuneError(f"deepspeed {p}: no such file")
        try:
            zero = json.loads(p.read_text()).get("zero_optimization", {})
        except json.JSONDecodeError as exc:
            raise GuardtuneError(f"deepspeed {p}: invalid JSON ({exc.msg})") from None
        raw.setdefault("zero_stage", zero.get("stage", 0))
        opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
        raw.setdefault("offload", "all" if par else "optimizer" if opt else "none")
    nproc, nnodes = raw.pop("nproc", None), raw.pop("nnodes", None)
    if nproc is not None or nnodes is not None:
        raw.setdefault("devices", int(nproc or 1) * int(nnodes or 1))
