"""The serve config: which base, which engine, which task runs which adapter, and the limits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from guardrails.moderation import ModerationConfig
from guardrails.stores import check_target
from kernel.configfile import read_mapping, validated
from kernel.encoder import MODEL_ID as ENCODER_ID
from kernel.errors import GuardtuneError
from kernel.models import DEFAULT_BASE_MODEL
from kernel.paths import DEFAULT_ADAPTERS_DIR, MANIFEST_NAME


@dataclass(frozen=True)
class Keys:
    users: set[str]
    admin: str | None
    ops: str | None

    @property
    def any(self) -> bool:
        return bool(self.users) or self.admin is not None or self.ops is not None

    def ops_readers(self) -> set[str]:
        """Keys that may read /metrics and /dashboard: every key there is."""
        return self.users | {k for k in (self.admin, self.ops) if k is not None}


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive whole within this (slow clients get 408)")
    header_timeout_s: float = Field(10.0, gt=0, description="the request line and headers must arrive within this")
    max_header_bytes: int = Field(65536, ge=4096, description="request line plus headers; more gets 400")
    max_tokens_cap: int = Field(512, ge=1, description="upper bound on max_tokens; also the default")
    max_concurrency: int = Field(8, ge=1, description="requests generating at once")
    max_queue: int = Field(32, ge=0, description="requests waiting beyond max_concurrency; more get 429")
    queue_timeout_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    rate_limit_per_min: int = Field(0, ge=0, description="per API key; 0 = off")
    # Checked before any guard work, so a hostile request costs a length check, not a scan.
    max_messages: int = Field(64, ge=1, description="turns per chat request; more get 400")
    max_input_chars: int = Field(32000, ge=1, description="characters per request (all turns and names; each "
                                                          "moderation input); more get 400")


# A SQLite file path (a Path) or a postgresql:// URL (kept as a string; a Path would fold its '//').
StoreTarget = Annotated[Path | str, BeforeValidator(check_target)]
OptionalStoreTarget = Annotated[Path | str | None, BeforeValidator(lambda v: None if v is None else check_target(v))]


class TaskCompliance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["enforce", "monitor", "off"] = "enforce"
    threshold: float = Field(0.6, gt=0, le=1)


class ComplianceConfig(TaskCompliance):
    store: Path = Field(description="built by `guardtune scripts build LIBRARY --out STORE`")
    library: Path | None = Field(None, description="built into `store` at start-up when the store is missing")
    per_task: dict[str, TaskCompliance] = Field(default_factory=dict)
    sessions_db: StoreTarget = Field(Path("state/sessions.db"),
                                     description="SQLite file, or a postgresql:// URL shared by replicas")

    def for_task(self, task: str) -> TaskCompliance:
        return self.per_task.get(task, TaskCompliance(mode=self.mode, threshold=self.threshold))


class OutputConfig(BaseModel):
    """What every guarded reply goes through on its way out, whatever the compliance mode."""
    model_config = ConfigDict(extra="forbid")
    redact_pii: bool = Field(True, description="PII in a reply that is sent as written (monitor, compliance off) "
                                               "is redacted, streamed or not")
    leak_min_chars: int = Field(40, ge=0, description="a reply repeating this many characters of a system prompt "
                                                      "verbatim is replaced (0 = off)")
    canary: bool = Field(False, description="add a per-task secret marker to the system prompt; a reply that "
                                            "carries it is replaced")
    leak_reply: str = "Sorry, I can't share that."


class GuardrailsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(default_factory=lambda: ["*"], description="guarded tasks; '*' is every task and the base")
    base_model: Literal["guarded", "refuse"] = Field(
        "guarded", description="the base model behind guardrails like a task, or not served at all")
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)
    tools: dict[str, list[str]] = Field(default_factory=dict, description="task -> the tools it may be offered "
                                        "and call; a request offering another gets 400 (a task not listed: any)")
    output: OutputConfig = Field(default_factory=OutputConfig)
    compliance: ComplianceConfig | None = None
    audit_db: StoreTarget = Field(Path("audit/audit.db"), description="one record per guarded request: a SQLite file (WAL), or a postgresql:// URL shared by replicas")
    audit_retention_days: float | None = Field(None, gt=0, description="audit records older than this are deleted "
                                                                       "(hourly); default: kept")


class RetrievalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: Path = Field(description="built by `guardtune rag ingest DIR --index PATH`")
    top_k: int = Field(3, ge=1, le=20)
    min_score: float = Field(0.3, ge=0, le=1)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str = DEFAULT_BASE_MODEL
    engine: Literal["vllm", "transformers"] = "vllm"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    adapters_root: Path = DEFAULT_ADAPTERS_DIR
    tasks: dict[str, Path] | None = Field(None, description="task -> adapter dir; default: every adapter under adapters_root")
    state_file: Path | None = Field(None, description="runtime task mapping; default <adapters_root>/.serve-state.json")
    task_store: OptionalStoreTarget = Field(
        None, description="the committed task mapping (tasks and canaries) shared by replicas: a SQLite file or a "
                          "postgresql:// URL, which every replica follows; default: state_file, this server only")
    task_store_poll_s: float = Field(2.0, gt=0, le=3600, description="how often a replica reads task_store for "
                                                                     "changes (failed tasks: 5x as long)")
    max_loras: int = Field(4, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    max_model_len: int = Field(2048, ge=64)
    kv_cache_gb: float = Field(2.0, gt=0, description="vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    # Past one GPU (vLLM only): GPUs used = tensor x pipeline; past one node use ray (deploy/README.md).
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs that split each layer (within a node)")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: stages of layers (across GPUs or nodes)")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM workers: mp (one node) or ray (several nodes); default: vLLM's choice")
    on_engine_death: Literal["restart", "exit"] = Field(
        "restart", description="when the engine's process dies: start a new one with the same tasks, or exit "
                               "with status 3 for a supervisor to restart the server")
    api_keys: list[str] = Field(default_factory=list, description="also GUARDTUNE_API_KEYS (comma-separated); empty = open")
    admin_key: str | None = Field(None, description="also GUARDTUNE_ADMIN_KEY; admin routes are refused without one")
    ops_key: str | None = Field(None, description="also GUARDTUNE_OPS_KEY; a read-only key for /metrics and /dashboard "
                                                  "(which take any API key or the admin key too, once keys are set)")
    trusted_proxies: list[str] = Field(default_factory=list, description="addresses whose X-Forwarded-For is believed; "
                                                                         "default: none")
    tool_call_parser: str | None = Field(None, description="vLLM's tool parser (e.g. hermes) that reads calls "
                                          "out of replies for tool_choice auto; named and required need none")
    limits: Limits = Field(default_factory=Limits)
    guardrails: GuardrailsConfig | None = None
    rag: dict[str, RetrievalConfig] = Field(default_factory=dict, description="task -> knowledge index")
    embeddings: dict[str, Path] = Field(default_factory=dict, description=(
        "model id -> a sentence-transformers directory, served by /v1/embeddings beside the packaged "
        f"{ENCODER_ID}"))

    @model_validator(mode="after")
    def _parallel_needs_vllm(self) -> ServeConfig:
        if self.engine != "vllm" and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1
                                      or self.distributed_executor_backend is not None):
            raise ValueError("tensor_parallel_size, pipeline_parallel_size and distributed_executor_backend "
                             "need engine: vllm")
        return self

    @model_validator(mode="after")
    def _embedding_models(self) -> ServeConfig:
        for model_id, path in self.embeddings.items():
            if not 1 <= len(model_id) <= 128 or model_id == ENCODER_ID:
                raise ValueError(f"embeddings: model id {model_id!r} must be 1 to 128 characters and not "
                                 f"{ENCODER_ID!r} (the packaged encoder)")
            if not path.is_dir():
                raise ValueError(f"embeddings: {model_id}: {path} is not a directory")
        return self

    def embedding_models(self) -> dict[str, Path | None]:
        """What /v1/embeddings serves: model id -> directory (None: the packaged encoder)."""
        return {ENCODER_ID: None, **self.embeddings}

    def resolved_state_file(self) -> Path:
        return self.state_file or self.adapters_root / ".serve-state.json"

    def keys(self) -> Keys:
        env = [k.strip() for k in os.environ.get("GUARDTUNE_API_KEYS", "").split(",") if k.strip()]
        users, admin = set(self.api_keys) | set(env), os.environ.get("GUARDTUNE_ADMIN_KEY") or self.admin_key
        ops = os.environ.get("GUARDTUNE_OPS_KEY") or self.ops_key
        if admin is not None and admin in users:  # a user key must never open /admin
            raise GuardtuneError("the admin key must differ from every API key (admin_key / GUARDTUNE_ADMIN_KEY)")
        if ops is not None and (ops in users or ops == admin):
            raise GuardtuneError("the ops key must differ from every API key and the admin key")
        return Keys(users, admin, ops)

    def initial_tasks(self) -> dict[str, Path]:
        if self.tasks is not None:
            return dict(self.tasks)
        root = self.adapters_root
        if not root.is_dir():
            return {}
        return {p.name: p for p in sorted(root.iterdir()) if (p / MANIFEST_NAME).is_file() and not p.name.startswith(".")}


def load_serve_config(path: str | Path | None, **overrides) -> ServeConfig:
    raw: dict = {}
    if path is not None:
        raw = read_mapping(path, "serve config")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return validated(ServeConfig, raw, f"serve config {path or '(defaults)'}")
