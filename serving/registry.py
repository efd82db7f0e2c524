"""Tasks and their adapters: validated before going live, swapped atomically, unloaded after draining.

A request pins the slot it started on; a swap only changes which slot new requests get. The old
slot is unloaded from the engine once its last request finishes, so weights are never mixed.
The committed mapping is persisted atomically so a restart serves exactly the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from guardtune.errors import GuardtuneError
from guardtune.manifest import Manifest
from serving.engines.base import AdapterRef
from serving.prompts import PromptFormat

log = logging.getLogger("guardtune.serve")


class AdapterRejected(GuardtuneError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Slot:
    task: str
    path: Path
    manifest: Manifest
    ref: AdapterRef
    inflight: int = 0
    retired: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def fmt(self) -> PromptFormat:
        return PromptFormat.from_manifest(self.manifest)

    def summary(self) -> dict:
        m = self.manifest
        return {"task": self.task, "adapter_id": self.ref.lora_id, "path": str(self.path), "method": m.method,
                "rank": m.rank, "base_model": m.base_model.id, "created_at": m.created_at,
                "metrics": m.metrics.model_dump(exclude_none=True), "inflight": self.inflight}


class TaskRegistry:
    def __init__(self, engine, *, base_sha256: str, adapters_root: Path, max_lora_rank: int, state_file: Path,
                 on_swap=None):
        self.engine, self.base_sha256 = engine, base_sha256
        self.root = Path(adapters_root).resolve()
        self.max_lora_rank, self.state_file = max_lora_rank, Path(state_file)
        self.tasks: dict[str, Slot] = {}
        self._ids = itertools.count(1)  # vLLM caches LoRA weights by id: never reuse one
        self._swap_lock = asyncio.Lock()
        self._on_swap = on_swap or (lambda task: None)

    # --- validation -------------------------------------------------------------------------
    def validate(self, path: str | Path) -> tuple[Path, Manifest]:
        raw = Path(path)
        candidate = raw if raw.is_absolute() else self.root / raw
        try:  # a NUL byte, a name over the OS's length limit or a symlink loop is a bad path, not a crash
            if not candidate.exists() and not raw.is_absolute() and raw.exists():
                candidate = raw  # a path relative to the working directory, as the CLI passes it
            real = candidate.resolve()  # follows symlinks, so a link out of the root is caught
            is_dir = real.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:
            raise AdapterRejected(400, f"adapter path is unusable: {type(exc).__name__}") from None
        if real != self.root and self.root not in real.parents:
            raise AdapterRejected(400, f"adapter path {path} is outside the adapters root {self.root}")
        if not is_dir:
            raise AdapterRejected(400, f"adapter path {path}: no such directory")
        try:
            manifest = Manifest.read(real)
        except GuardtuneError as exc:
            raise AdapterRejected(400, str(exc)) from None
        if manifest.is_full_model:
            raise AdapterRejected(409, f"{path} is a full model ({manifest.method} fine-tune), not an adapter: "
                                       f"serve it as the base model (`base_model: {real}` in the serve config)")
        if not (real / "adapter_config.json").is_file() or not any(real.glob("adapter_model.*")):
            raise AdapterRejected(400, f"adapter {path}: adapter_config.json or adapter weights missing")
        if manifest.serve_with != "vllm" and self.engine.name == "vllm":
            raise AdapterRejected(409, f"adapter {path} ({manifest.method}) cannot be served by vLLM, which serves "
                                       "only LoRA adapters: set `engine: transformers` in the serve config")
        if manifest.base_model.sha256 != self.base_sha256:
            raise AdapterRejected(409, f"adapter {path} was trained on another base "
                                       f"({manifest.base_model.id}, sha256 {manifest.base_model.sha256[:12]}...)")
        if manifest.rank is not None and manifest.rank > self.max_lora_rank:
            raise AdapterRejected(409, f"adapter {path} has rank {manifest.rank} > max_lora_rank {self.max_lora_rank}")
        return real, manifest

    # --- changes ----------------------------------------------------------------------------
    async def put(self, task: str, path: str | Path, *, persist: bool = True) -> Slot:
        async with self._swap_lock:
            real, manifest = self.validate(path)
            lora_id = next(self._ids)
            ref = AdapterRef(f"{task}@{lora_id}", lora_id, str(real))
            try:
                await self.engine.load_adapter(ref)
            except Exception as exc:
                raise AdapterRejected(400, f"adapter {path} failed to load: {type(exc).__name__}: {exc}") from None
            slot = Slot(task, real, manifest, ref)
            old = self.tasks.get(task)
            self.tasks[task] = slot  # the switch: one assignment, new requests see the new slot
            if persist:
                self._persist()
            self._on_swap(task)
            log.info("task %s -> %s (adapter id %d)", task, real, ref.lora_id)
            if old is not None:
                self._retire(old)
            return slot

    async def delete(self, task: str) -> None:
        async with self._swap_lock:
            old = self.tasks.pop(task)
            self._persist()
            self._retire(old)

    def _retire(self, slot: Slot) -> None:
        slot.retired = True
        if slot.inflight == 0:
            asyncio.get_running_loop().create_task(self._unload(slot))

    async def _unload(self, slot: Slot) -> None:
        try:
            await self.engine.unload_adapter(slot.ref)
        finally:
            slot.drained.set()
            log.info("unloaded drained adapter %s", slot.ref.name)

    @contextlib.contextmanager
    def pin(self, slot: Slot):
        slot.inflight += 1
        try:
            yield slot
        finally:
            slot.inflight -= 1
            if slot.retired and slot.inflight == 0:
                asyncio.get_running_loop().create_task(self._unload(slot))

    # --- persistence ------------------------------------------------------------------------
    def _persist(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(self.state_file.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({t: str(s.path) for t, s in self.tasks.items()}, indent=2))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)

    def committed_mapping(self) -> dict[str, str] | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise GuardtuneError(f"serve state {self.state_file} is unreadable: {exc}") from None
