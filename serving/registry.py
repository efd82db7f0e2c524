"""Tasks and their adapters: validated before going live, swapped atomically, unloaded after draining.

A request looks up and pins its task's slot in one step (no await between), so a swap or delete only
changes which slot later requests get. A replaced slot is unloaded from the engine once its last
request finishes, so weights are never mixed. Every change is written to the state file before it
takes effect in memory: a failed write changes nothing, and a restart serves exactly the last change.
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

from kernel.errors import GuardtuneError
from kernel.manifest import Manifest
from serving.engines.base import AdapterRef, Engine
from serving.prompts import PromptFormat

log = logging.getLogger("guardtune.serve")


class AdapterRejected(GuardtuneError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TaskNotFound(GuardtuneError):
    pass


class StateNotSaved(GuardtuneError):
    """The state file could not be written; the change was not made."""


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
    def __init__(self, engine: Engine, *, base_sha256: str, adapters_root: Path, max_lora_rank: int, state_file: Path,
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
        if manifest.serve_with != "vllm" and not self.engine.serves(manifest.serve_with):  # any engine serves LoRA
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
            ref = AdapterRef(f"{task}@{lora_id}", lora_id, str(real), manifest.serve_with)
            try:
                await self.engine.load_adapter(ref)
            except Exception as exc:
                raise AdapterRejected(400, f"adapter {path} failed to load: {type(exc).__name__}: {exc}") from None
            if persist:  # disk first; on success nothing is awaited before the switch below
                await self._save_or_unload({**self.mapping(), task: str(real)}, ref)
            slot = Slot(task, real, manifest, ref)
            old = self.tasks.get(task)
            self.tasks[task] = slot  # the switch: one assignment, new requests see the new slot
            self._on_swap(task)
            log.info("task %s -> %s (adapter id %d)", task, real, ref.lora_id)
            if old is not None:
                self._retire(old)
            return slot

    async def delete(self, task: str) -> None:
        async with self._swap_lock:  # checked under the lock: of two concurrent deletes, one finds nothing
            if task not in self.tasks:
                raise TaskNotFound(f"unknown task '{task}'")
            self._save({t: p for t, p in self.mapping().items() if t != task})
            self._retire(self.tasks.pop(task))

    def mapping(self) -> dict[str, str]:
        return {t: str(s.path) for t, s in self.tasks.items()}

    async def _save_or_unload(self, mapping: dict[str, str], loaded: AdapterRef) -> None:
        try:
            self._save(mapping)
        except StateNotSaved:
            await self._unload_quietly(loaded)  # never went live
            raise

    async def _unload_quietly(self, ref: AdapterRef) -> None:
        try:
            await self.engine.unload_adapter(ref)
        except Exception as exc:  # noqa: BLE001 - the save error is the one to report
            log.error("could not unload adapter %s: %s: %s", ref.name, type(exc).__name__, exc)

    def _retire(self, slot: Slot) -> None:
        slot.retired = True
        self._unload_if_drained(slot)

    def _unload_if_drained(self, slot: Slot) -> None:
        if slot.retired and slot.inflight == 0:  # once per slot: a retired slot can no longer be pinned
            asyncio.get_running_loop().create_task(self._unload(slot))

    async def _unload(self, slot: Slot) -> None:
        try:
            await self.engine.unload_adapter(slot.ref)
        finally:
            slot.drained.set()
            log.info("unloaded drained adapter %s", slot.ref.name)

    @contextlib.contextmanager
    def pinned(self, task: str):
        """The task's current slot, held until the block exits. Lookup and pin are one step (no await
        between), so a swap cannot retire and unload the slot before the request holds it."""
        slot = self.tasks.get(task)
        if slot is None:
            raise TaskNotFound(f"unknown task '{task}'")
        slot.inflight += 1
        try:
            yield slot
        finally:
            slot.inflight -= 1
            self._unload_if_drained(slot)

    # --- persistence ------------------------------------------------------------------------
    def _save(self, mapping: dict[str, str]) -> None:
        """Write the mapping, synchronously: no await between the write and the caller's switch in memory."""
        try:
            write_state(self.state_file, mapping)
        except OSError as exc:
            log.error("serve state %s not written: %s", self.state_file, exc)
            raise StateNotSaved(f"the task mapping could not be saved to {self.state_file} "
                                f"({type(exc).__name__}: {exc.strerror or exc}); nothing was changed") from None

    def committed_mapping(self) -> dict[str, str] | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise GuardtuneError(f"serve state {self.state_file} is unreadable: {exc}") from None


def write_state(path: Path, mapping: dict[str, str]) -> None:
    """Write-fsync-rename, then fsync the directory so the rename itself survives a power cut.
    Raises OSError only while the old file is still the one on disk."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with tmp.open("w") as fh:
            fh.write(json.dumps(mapping, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    try:
        fsync_dir(directory)
    except OSError as exc:  # the new file is in place and is what a reader sees: the change stands
        log.warning("serve state %s written but its directory not fsynced: %s", path, exc)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
