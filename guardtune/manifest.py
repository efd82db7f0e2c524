"""The adapter manifest: the contract between training (writer) and serving (reader).

Serving renders prompts only from what is recorded here, so the two can never disagree
on the chat template, system prompt or stop tokens.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardtune.errors import GuardtuneError
from guardtune.paths import MANIFEST_NAME

MANIFEST_VERSION = 1


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
    method: Literal["lora", "qlora", "dora"]
    serve_with: Literal["vllm", "transformers"] = "vllm"
    rank: int
    alpha: float
    target_modules: list[str] | str
    chat_template: str
    system_prompt: str | None = Field(
        description="injected when a request has no system turn; null means the template's own default"
    )
    stop_tokens: list[str]
    max_context: int
    data_fingerprint: str
    metrics: Metrics
    train_config: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

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
            raise GuardtuneError(f"{path}: invalid manifest at '{where}': {first['msg']}") from None


def resolve_manifest_base(manifest: Manifest) -> Path:
    """The manifest's base by id (portable across machines), else by recorded path; its hash must match."""
    from guardtune.models import resolve_base_model, weights_sha256

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
