"""Tasks and their adapters: validated before going live, swapped atomically, unloaded after draining;
a task's canary (a second adapter for a share of its traffic), promoted or rolled back.

A request looks up and pins its task's slot in one step (no await between), so a swap or delete only
changes which slot later requests get. A replaced slot is unloaded from the engine once its last
request finishes, so weights are never mixed. Every change is written to the task store
(serving/task_store.py) before it takes effect in memory: a failed write changes nothing, and a restart
serves exactly the last change. With a shared store, `sync` applies what other replicas committed
through the same steps (validate, load, switch, drain the old).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from kernel.errors import GuardtuneError
from kernel.manifest import Manifest
from serving.engines.base import AdapterRef, Engine
from serving.prompts import PromptFormat
from serving.task_store import Committed, FileTaskStore, StateNotSaved, fsync_dir, write_state

__all__ = ["CANARY", "STABLE", "AdapterRejected", "NoCanary", "StateNotSaved", "TaskNotFound", "TaskRegistry",
           "fsync_dir", "split_point", "write_state"]
log = logging.getLogger("guardtune.serve")
STABLE, CANARY = "stable", "canary"  # which of a task's adapters served a request (metrics, audit, responses)


class AdapterRejected(GuardtuneError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TaskNotFound(GuardtuneError):
    pass


class NoCanary(GuardtuneError):
    pass


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


@dataclass
class Canary:
    slot: Slot
    share: float  # of the task's sessions (and of its requests without one)


def split_point(task: str, session: str | None) -> float:
    """Where a request falls in [0, 1) (below the canary's share: the canary serves it). A session always
    falls at the same point, on every replica, so it stays on one version; a request without one anywhere."""
    if session is None:
        return random.random()
    return int.from_bytes(hashlib.sha256(f"{task}\0{session}".encode()).digest()[:8], "big") / 2**64


class TaskRegistry:
    def __init__(self, engine: Engine, *, base_sha256: str, adapters_root: Path, max_lora_rank: int,
                 state_file: Path | None = None, store=None, on_swap=None):
        """`store`: a serving.task_store store; default: the state file `state_file`."""
        self.engine, self.base_sha256 = engine, base_sha256
        self.root = Path(adapters_root).resolve()
        self.max_lora_rank = max_lora_rank
        self.store = store if store is not None else FileTaskStore(Path(state_file))
        self.tasks: dict[str, Slot] = {}
        self.canaries: dict[str, Canary] = {}
        self.errors: dict[str, str] = {}  # task -> why this server does not serve what the store holds for it
        self.version = 0  # the store's version this server serves
        self.store_error: str | None = None  # why the last read of a shared store failed
        self._retry_at = 0.0
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

    # --- changes an admin asks for: committed to the store, then switched here ------------------------
    async def put(self, task: str, path: str | Path, *, persist: bool = True) -> Slot:
        async with self._swap_lock:
            slot = await self._load(task, path)
            if persist:
                await self._commit(task, lambda c: c.with_task(task, self._stored(slot.path)), slot.ref)
            self._set_stable(task, slot)
            return slot

    async def delete(self, task: str) -> None:
        async with self._swap_lock:  # checked under the lock: of two concurrent deletes, one finds nothing
            if task not in self.tasks:
                raise TaskNotFound(f"unknown task '{task}'")
            await self._commit(task, lambda c: c.without_task(task))
            self._drop(task)

    async def put_canary(self, task: str, path: str | Path, share: float) -> None:
        """Serve `share` of the task's sessions with the adapter at `path`; the same adapter again only
        changes the share."""
        async with self._swap_lock:
            if task not in self.tasks:
                raise TaskNotFound(f"unknown task '{task}'")
            current = self.canaries.get(task)
            real, _ = self.validate(path)
            same = current is not None and current.slot.path == real
            slot = current.slot if same else await self._load(task, real)
            await self._commit(task, lambda c: c.with_canary(task, self._stored(slot.path), share),
                               None if same else slot.ref)
            self._set_canary(task, slot, share)

    async def promote(self, task: str) -> None:
        """The canary becomes the task's adapter (already loaded: nothing to load); the old one drains."""
        async with self._swap_lock:
            canary = self._canary(task)
            await self._commit(task, lambda c: c.with_task(task, self._stored(canary.slot.path)).without_canary(task))
            self._promote(task)

    async def rollback(self, task: str) -> None:
        async with self._swap_lock:
            self._canary(task)
            await self._commit(task, lambda c: c.without_canary(task))
            self._drop_canary(task)

    def _canary(self, task: str) -> Canary:
        if task not in self.tasks:
            raise TaskNotFound(f"unknown task '{task}'")
        if task not in self.canaries:
            raise NoCanary(f"task '{task}' has no canary")
        return self.canaries[task]

    async def _load(self, task: str, path: str | Path) -> Slot:
        real, manifest = self.validate(path)
        lora_id = next(self._ids)
        ref = AdapterRef(f"{task}@{lora_id}", lora_id, str(real), manifest.serve_with)
        try:
            await self.engine.load_adapter(ref)
        except Exception as exc:
            raise AdapterRejected(400, f"adapter {path} failed to load: {type(exc).__name__}: {exc}") from None
        return Slot(task, real, manifest, ref)

    async def _commit(self, task: str, change, loaded: AdapterRef | None = None) -> None:
        """The change to `task`, written to the store before it takes effect here; when the write fails, what
        was loaded for it is unloaded (it never went live) and nothing changes."""
        served = self.served()
        try:
            if self.store.shared:  # a database call: off the event loop, and finished even if the caller goes
                result = await asyncio.shield(asyncio.to_thread(self.store.update, change, served))
                if result.version == self.version + 1:  # no other replica's change in between: all of it is served
                    self.version = result.version  # (else the follower applies the others' changes, then moves on)
            else:  # the state file: synchronous, so nothing is awaited between the write and the switch
                self.version = self.store.update(change, served).version
        except BaseException:
            if loaded is not None:
                await self._unload_quietly(loaded)
            raise
        self.errors.pop(task, None)  # this server now serves what it committed for the task

    # --- following the store ----------------------------------------------------------------------
    async def start(self, initial: dict[str, Path]) -> None:
        """Serve the committed mapping, or `initial` (the config's tasks) when nothing is committed yet;
        the first replica to find a shared store empty commits what it serves."""
        async with self._swap_lock:
            committed = await asyncio.to_thread(self.store.read)
            await self._follow(committed or Committed(tasks={t: str(p) for t, p in initial.items()}))
            if committed is None and self.store.shared:
                served = self.served()
                winner = await asyncio.to_thread(self.store.update, lambda c: c if c.version else served, served)
                await self._follow(winner)

    async def sync(self, retry_s: float) -> None:
        """Apply the shared store's mapping when its version moved; tasks that failed are retried every
        `retry_s`. A store that cannot be read is reported (`store_error`), and the mapping stays."""
        async with self._swap_lock:  # read under the lock: an admin change here cannot fall between read and apply
            try:
                committed = await asyncio.to_thread(self.store.read)
            except (GuardtuneError, ValueError) as exc:
                if self.store_error != str(exc):
                    log.error("task store %s not read: %s", self.store.label, exc)
                self.store_error = str(exc)
                return
            self.store_error = None
            retry = bool(self.errors) and time.monotonic() >= self._retry_at
            if committed is None or (committed.version == self.version and not retry):
                return
            await self._follow(committed)
            self._retry_at = time.monotonic() + retry_s

    async def _follow(self, state: Committed) -> None:
        for task in [*self.tasks, *(t for t in {**state.tasks, **self.errors} if t not in self.tasks)]:
            try:
                await self._apply(task, state)
                self.errors.pop(task, None)
            except Exception as exc:  # noqa: BLE001 - one task's failure stops neither the others nor the server
                msg = str(exc) if isinstance(exc, GuardtuneError) else f"{type(exc).__name__}: {exc}"
                if self.errors.get(task) != msg:
                    log.error("task %s not served as committed (version %d): %s", task, state.version, msg)
                self.errors[task] = msg
        if state.version != self.version:
            log.info("serving task mapping version %d: %s", state.version, ", ".join(self.tasks) or "(none)")
        self.version = state.version

    async def _apply(self, task: str, state: Committed) -> None:
        """Make this server serve what `state` holds for `task`: its adapter (a promoted canary is already
        loaded), its canary and the canary's share."""
        want = state.tasks.get(task)
        if want is None:
            if task in self.tasks:
                self._drop(task)
            return
        slot, canary = self.tasks.get(task), self.canaries.get(task)
        stable_error: Exception | None = None
        if slot is None or not self._same(slot, want):
            if canary is not None and self._same(canary.slot, want):
                self._promote(task)
            else:
                try:
                    self._set_stable(task, await self._load(task, want))
                except Exception as exc:  # noqa: BLE001 - raised below, after the canary part
                    stable_error = exc
        try:  # even when the stable adapter failed to load here: a rollback must reach every replica
            await self._apply_canary(task, state)
        finally:
            if stable_error is not None:
                raise stable_error

    async def _apply_canary(self, task: str, state: Committed) -> None:
        canary, want_canary = self.canaries.get(task), state.canaries.get(task)
        if want_canary is None:
            self._drop_canary(task)
        elif canary is None or not self._same(canary.slot, want_canary["path"]):
            try:
                slot = await self._load(task, want_canary["path"])
            except AdapterRejected as exc:
                raise AdapterRejected(exc.status, f"canary: {exc}") from None
            self._set_canary(task, slot, want_canary["share"])
        else:
            canary.share = want_canary["share"]

    def _stored(self, real: Path) -> str:
        """How the store names an adapter dir: relative to adapters_root in a shared store (replicas may mount
        it elsewhere), absolute in the state file."""
        return real.relative_to(self.root).as_posix() if self.store.shared else str(real)

    def _same(self, slot: Slot, stored: str) -> bool:
        try:
            raw = Path(stored)
            return (raw if raw.is_absolute() else self.root / raw).resolve() == slot.path
        except (OSError, ValueError, RuntimeError):
            return False

    # --- switching in memory (no await: a request sees the old state or the new) -----------------------
    def _set_stable(self, task: str, slot: Slot) -> None:
        old = self.tasks.get(task)
        self.tasks[task] = slot  # the switch: one assignment, new requests see the new slot
        self._on_swap(task)
        log.info("task %s -> %s (adapter id %d)", task, slot.path, slot.ref.lora_id)
        if old is not None:
            self._retire(old)

    def _set_canary(self, task: str, slot: Slot, share: float) -> None:
        old = self.canaries.get(task)
        self.canaries[task] = Canary(slot, share)
        if old is None or old.slot is not slot:
            self._on_swap(task)
            log.info("task %s canary -> %s (adapter id %d), share %g", task, slot.path, slot.ref.lora_id, share)
            if old is not None:
                self._retire(old.slot)

    def _promote(self, task: str) -> None:
        canary = self.canaries.pop(task)
        old, self.tasks[task] = self.tasks[task], canary.slot
        log.info("task %s: canary %s promoted", task, canary.slot.ref.name)
        self._retire(old)

    def _drop_canary(self, task: str) -> None:
        if (canary := self.canaries.pop(task, None)) is not None:
            log.info("task %s: canary %s rolled back", task, canary.slot.ref.name)
            self._retire(canary.slot)

    def _drop(self, task: str) -> None:
        self._drop_canary(task)
        self._retire(self.tasks.pop(task))

    # --- what is served -----------------------------------------------------------------------------
    def mapping(self) -> dict[str, str]:
        return {t: str(s.path) for t, s in self.tasks.items()}

    def served(self) -> Committed:
        return Committed(self.version, {t: self._stored(s.path) for t, s in self.tasks.items()},
                         {t: {"path": self._stored(c.slot.path), "share": c.share} for t, c in self.canaries.items()})

    def slots(self) -> list[Slot]:
        """Every loaded slot in use: each task's and each canary's."""
        return [*self.tasks.values(), *(c.slot for c in self.canaries.values())]

    def view(self, task: str) -> dict:
        """A task as the admin API shows it: its adapter, its canary, and whether this server follows the store."""
        slot, canary = self.tasks.get(task), self.canaries.get(task)
        out = slot.summary() if slot is not None else {"task": task, "adapter_id": None, "path": None}
        out["canary"] = {**canary.slot.summary(), "share": canary.share} if canary is not None else None
        return out | {"following": task not in self.errors, "error": self.errors.get(task)}

    def views(self) -> list[dict]:
        return [self.view(t) for t in [*self.tasks, *(t for t in self.errors if t not in self.tasks)]]

    # --- draining -----------------------------------------------------------------------------------
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
    def pinned(self, task: str, session: str | None = None):
        """The task's slot for this request and which version it is (STABLE or CANARY), held until the block
        exits. Lookup and pin are one step (no await between), so a swap cannot retire and unload the slot
        before the request holds it. `session` (the scoped session id) keeps a session on one version."""
        slot, version = self.tasks.get(task), STABLE
        if slot is None:
            raise TaskNotFound(f"unknown task '{task}'")
        canary = self.canaries.get(task)
        if canary is not None and split_point(task, session) < canary.share:
            slot, version = canary.slot, CANARY
        slot.inflight += 1
        try:
            yield slot, version
        finally:
            slot.inflight -= 1
            self._unload_if_drained(slot)
