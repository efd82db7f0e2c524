"""vLLM's AsyncLLM in this process; its engine core runs in a child process that it owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import AsyncIterator

from serving.engines.base import AdapterRef, Delta, EngineDead, EngineRefused, GenParams, TokenLogprob

log = logging.getLogger("guardtune.serve")


def _cpu_env(kv_cache_gb: float) -> None:
    # Measured on 2 cores: binding OMP threads to all cores and reserving none is 3-4x faster than defaults.
    n = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}" if n > 1 else "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gb))))


def parallel_args(cfg) -> dict:
    """vLLM's parallelism settings from the serve config (deploy/README.md: past one GPU, past one node)."""
    args = {"tensor_parallel_size": cfg.tensor_parallel_size, "pipeline_parallel_size": cfg.pipeline_parallel_size}
    if cfg.distributed_executor_backend is not None:  # None leaves vLLM's own choice (uni, mp or ray)
        args["distributed_executor_backend"] = cfg.distributed_executor_backend
    return args


def sampling_params(params: GenParams):
    """vLLM's SamplingParams for one request, streamed as deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if params.json_schema is not None:
        structured = StructuredOutputsParams(json=params.json_schema)
    elif params.json_object:
        structured = StructuredOutputsParams(json_object=True)
    # The format's end-of-turn ids are this model's EOS: ignore_eos ignores them too, as vLLM's server does.
    stop_ids = None if params.ignore_eos else params.stop_token_ids or None
    return SamplingParams(n=params.n, max_tokens=params.max_tokens, temperature=params.temperature,
                          top_p=params.top_p, seed=params.seed, stop=params.stop or None, stop_token_ids=stop_ids,
                          top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                          presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                          logit_bias=params.logit_bias or None, logprobs=params.logprobs,
                          structured_outputs=structured, min_tokens=params.min_tokens, ignore_eos=params.ignore_eos,
                          skip_special_tokens=params.skip_special_tokens, output_kind=RequestOutputKind.DELTA)


def token_logprobs(c) -> list[TokenLogprob]:
    """A CompletionOutput delta's logprobs: per token, the chosen token, then the alternatives as vLLM ranks them."""
    steps = []
    for token_id, ranked in zip(c.token_ids, c.logprobs or []):
        chosen = ranked[token_id]
        steps.append(TokenLogprob(chosen.decoded_token or "", max(chosen.logprob, -9999.0),
                                  tuple((lp.decoded_token or "", max(lp.logprob, -9999.0)) for lp in ranked.values())))
    return steps


def _descendants() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def _is_mp_helper(proc) -> bool:
    """multiprocessing's resource tracker is shared by the whole server, not part of one engine."""
    try:
        return "resource_tracker" in " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone already
        return True


class VLLMEngine:
    name = "vllm"

    def __init__(self, cfg, base_dir):
        self.cfg, self.base_dir = cfg, str(base_dir)
        self.llm = None
        self.load_seconds: float | None = None

    async def start(self) -> None:
        import torch

        if not torch.cuda.is_available():
            _cpu_env(self.cfg.kv_cache_gb)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.time()
        args = AsyncEngineArgs(
            model=self.base_dir,
            dtype="float32" if not torch.cuda.is_available() else "auto",
            enable_lora=True,
            max_loras=self.cfg.max_loras,
            max_lora_rank=self.cfg.max_lora_rank,
            max_model_len=self.cfg.max_model_len,
            max_num_seqs=self.cfg.limits.max_concurrency,
            disable_log_stats=False,
            seed=0,
            **parallel_args(self.cfg),
        )
        # Built in a worker thread: it blocks for the whole model load, and a restart after the engine
        # core died must not stall the event loop (requests meanwhile get a quick 503).
        before = {p.pid for p in _descendants()}
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        # Its processes, kept by identity: when the engine core is killed, its workers are re-parented away
        # from this process and would live on, holding a copy of the model, unless reaped here.
        self._procs = [p for p in _descendants() if p.pid not in before and not _is_mp_helper(p)]
        self.load_seconds = time.time() - t0

    async def restart(self) -> None:
        """After the engine core process died: release what is left of the old engine, start a fresh one."""
        old, self.llm = self.llm, None
        if old is not None:
            await asyncio.to_thread(old.shutdown)
        self._reap()
        await self.start()

    def _reap(self) -> None:
        import psutil

        for p in getattr(self, "_procs", []):
            with contextlib.suppress(psutil.Error):
                p.kill()  # psutil checks the pid still names the same process (create time) before signalling
        self._procs = []

    def serves(self, engine: str) -> bool:
        return engine == "vllm"  # LoRA only: DoRA and prompt methods go to transformers (engines/routed.py)

    def ready(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def unsupported(self, params: GenParams, adapter: AdapterRef | None) -> list[str]:
        return []  # every GenParams field is a SamplingParams field

    async def generate(self, request_id: str, prompt_ids: list[int], params: GenParams,
                       adapter: AdapterRef | None) -> AsyncIterator[Delta]:
        from vllm.inputs import TokensPrompt

        if not self.ready():
            raise EngineDead("vLLM engine is not running")
        n_out, finished = [0] * params.n, False
        llm = self.llm  # a restart swaps self.llm; judge a failure by the engine that failed
        try:
            async with contextlib.aclosing(llm.generate(TokensPrompt(prompt_token_ids=prompt_ids),
                                                        sampling_params(params), request_id,
                                                        lora_request=self._lora(adapter))) as outs:
                async for out in outs:
                    finished = out.finished
                    for c in out.outputs:  # with n > 1, a delta may carry several choices
                        n_out[c.index] += len(c.token_ids)
                        finish = None
                        if c.finish_reason is not None:
                            finish = "length" if c.finish_reason == "length" else "stop"
                        yield Delta(c.text, n_out[c.index], finish, c.index,
                                    token_logprobs(c) if params.logprobs is not None else None)
        except Exception as exc:
            if llm.errored:
                raise EngineDead(f"vLLM engine died: {type(exc).__name__}") from exc
            if isinstance(exc, ValueError) and not any(n_out):  # vLLM checks a request's parameters on submission
                raise EngineRefused(f"the engine refused the request: {exc}"[:500]) from exc
            raise
        finally:
            if not finished:  # closed or cancelled mid-way (client gone, output filter): free its seat now
                # Shielded: in a cancelled anyio scope (a stream's) every await is cancelled again.
                await asyncio.shield(self._abort(llm, request_id))

    def _lora(self, adapter: AdapterRef | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.name, adapter.lora_id, adapter.path)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        await self.llm.add_lora(self._lora(adapter))

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        await self.llm.remove_lora(adapter.lora_id)

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self._abort(self.llm, request_id)

    @staticmethod
    async def _abort(llm, request_id: str) -> None:
        """Idempotent: vLLM's own generator aborts on close too, and an id it no longer knows is ignored."""
        if llm.errored:  # a dead engine has nothing left to abort
            return
        try:
            await llm.abort(request_id)
        except Exception as exc:  # noqa: BLE001 - best effort: the request's own outcome is what counts
            log.warning("engine request %s not aborted: %s: %s", request_id, type(exc).__name__, exc)
            return
        log.info("engine request %s aborted", request_id)

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        self._reap()  # after a normal shutdown nothing is left; after a death the orphaned workers are
