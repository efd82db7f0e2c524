"""The adapter manifest: the contract between training (writer) and serving (reader).

Serving renders prompts only from what is recorded here, so the two can never disagree
on the chat template, system prompt or stop tokens.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kernel.errors import GuardtuneError
from kernel.models import resolve_base_model, weights_sha256
from kernel.paths import MANIFEST_NAME

MANIFEST_VERSION = 1

# Training methods by what they produce and what can serve it.
LORA_METHODS = ("lora", "qlora", "dora")  # a LoRA-family adapter, served per task
FULL_METHODS = ("full", "freeze")  # a complete model directory: served as a base model, not as a task
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter")  # PEFT, transformers only
METHODS = LORA_METHODS + FULL_METHODS + PROMPT_METHODS
Method = Literal["lora", "qlora", "dora", "full", "freeze", "prompt_tuning", "p_tuning", "prefix_tuning",
                 "llama_adapter"]
Artifact = Literal["adapter", "full_model"]
ServeWith = Literal["vllm", "transformers"]


def serving_for(method: str) -> tuple[Artifact, ServeWith]:
    """What a method's output directory holds, and the least capable engine that can serve it.

    vLLM serves only plain LoRA adapters per task: it refuses DoRA ("does not yet support DoRA", vLLM
    0.32), and prompt, prefix and adaption-prompt adapters change the model's inputs or attention in ways
    it has no kernels for. Those go to the transformers engine, which a vLLM server starts beside vLLM
    for them (serving/engines/routed.py). A full-model directory is itself a base model (both engines
    serve it as `base_model`).
    """
    if method in FULL_METHODS:
        return "full_model", "vllm"
    if method in PROMPT_METHODS or method == "dora":
        return "adapter", "transformers"
    return "adapter", "vllm"


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="what the user named: an alias, a local path or a hub id")
    path: str = Field(description="the resolved local directory the weights came from")
    sha256: str = Field(description="content hash of the base weights (safetensors files)")


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    train_loss: float | None = None
    eval_loss: float | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    manifest_version: int = MANIFEST_VERSION
    task: str
    base_model: BaseModelRef
    method: Method
    artifact: Artifact = Field("adapter", description="adapter: a PEFT adapter dir; full_model: weights + tokenizer")
    serve_with: ServeWith = Field("vllm", description="vllm: any engine; transformers: only the transformers engine")
    rank: int | None = Field(None, description="LoRA rank; null for methods without one")
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    chat_template: str
    system_prompt: str | None = Field(
        description="injected when a request has no system turn; null means the template's own default"
    )
    stop_tokens: list[str]
    max_context: int
    data_fingerprint: str
    metrics: Metrics
    train_config: dict[str, Any] = Field(default_factory=dict)
    data_mix: list[dict[str, Any]] | None = Field(
        None, description="realised mix of `datasets:` sources: name, ratio, available and sampled rows, share"
    )
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        # Old manifests (LoRA family, no `artifact`) pass on the defaults; a hand-edited mismatch is caught
        # here rather than as a confusing load failure in an engine.
        artifact, serve_with = serving_for(self.method)
        if self.method == "dora" and self.serve_with == "vllm":
            self.serve_with = "transformers"  # written before vLLM's refusal of DoRA was known: route it right
        if self.artifact != artifact:
            raise ValueError(f"method {self.method} produces artifact '{artifact}', not '{self.artifact}'")
        if serve_with == "transformers" and self.serve_with != "transformers":
            raise ValueError(f"method {self.method} can only be served by the transformers engine")
        if self.method in LORA_METHODS and self.rank is None:
            raise ValueError(f"method {self.method} needs its rank recorded")
        return self

    @property
    def is_full_model(self) -> bool:
        return self.artifact == "full_model"

    def write(self, adapter_dir: Path) -> Path:
        path = Path(adapter_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def read(cls, adapter_dir: str | Path) -> "Manifest":
        path = Path(adapter_dir) / MANIFEST_NAME
        if not path.is_file():
            raise GuardtuneError(f"{adapter_dir}: no {MANIFEST_NAME}; not a guardtune adapter")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(root)"
            msg = first["msg"].removeprefix("Value error, ")
            raise GuardtuneError(f"{path}: invalid manifest at '{where}': {msg}") from None


def resolve_manifest_base(manifest: Manifest) -> Path:
    """The manifest's base by id (portable across machines), else by recorded path; its hash must match."""
    try:
        base_dir = resolve_base_model(manifest.base_model.id)
    except GuardtuneError:
        base_dir = Path(manifest.base_model.path)
        if not base_dir.is_dir():
            raise
    if weights_sha256(base_dir) != manifest.base_model.sha256:
        raise GuardtuneError(
            f"base model {manifest.base_model.id} at {base_dir} does not match the adapter's base "
            f"(sha256 {manifest.base_model.sha256[:12]}...)"
        )
    return base_dir
