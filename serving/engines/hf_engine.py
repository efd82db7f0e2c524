"""Plain transformers + peft engine, for machines where vLLM cannot run, and for the PEFT methods
vLLM cannot serve (prompt_tuning, p_tuning, prefix_tuning, llama_adapter); chosen by config.

One request decodes at a time, in a worker thread so the event loop keeps serving; deltas reach the
caller through an asyncio queue. LoRA-family adapters are switched per request on one shared
PeftModel. Each prompt-learning adapter is its own PeftModel over the same base weights (PEFT cannot
mix adapter types in one model), with the LoRA layers switched off while it decodes. A llama_adapter
wraps the attention modules of the model it is given, so it gets its own copy of the base.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import AsyncIterator

from kernel.manifest import PROMPT_METHODS, Manifest
from serving.engines.base import AdapterRef, Delta, GenParams


class TransformersEngine:
    name = "transformers"

    def __init__(self, cfg, base_dir, device: str | None = None):
        self.cfg, self.base_dir = cfg, base_dir
        self.device = device  # None: CUDA when there is one
        self.model = self.tokenizer = None
        self.base = None  # the base model; LoRA layers are injected into it in place
        self.adapters: dict[int, str] = {}  # lora_id -> peft adapter name on the shared PeftModel (LoRA family)
        self.prompt_models: dict[int, object] = {}  # lora_id -> own PeftModel (prompt methods, llama_adapter)
        self._lock = threading.Lock()
        self.load_seconds: float | None = None

    async def start(self) -> None:
        t0 = time.time()
        await asyncio.to_thread(self._load)
        self.load_seconds = time.time() - t0

    def _load(self) -> None:
        from transformers import AutoTokenizer

        self.model = self.base = self._fresh_base()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)

    def _fresh_base(self):
        import torch
        from transformers import AutoModelForCausalLM

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=dtype)
        return model.to(device).eval()

    async def restart(self) -> None:
        """In-process, this engine does not die; a restart reloads the base (the caller reloads adapters)."""
        with self._lock:
            self.model = self.base = None
            self.adapters.clear()
            self.prompt_models.clear()
        await self.start()

    def serves(self, engine: str) -> bool:
        return True  # every adapter method peft can load

    def unsupported(self, params: GenParams, adapter: AdapterRef | None) -> list[str]:
        """This engine's decoder does plain sampling and vLLM's sampling extensions: no logprobs, penalties,
        logit bias, guided JSON or several choices."""
        return params.extras()

    def ready(self) -> bool:
        return self.model is not None

    async def load_adapter(self, adapter: AdapterRef) -> None:
        await asyncio.to_thread(self._load_adapter, adapter)

    def _load_adapter(self, adapter: AdapterRef) -> None:
        from peft import PeftModel

        name = f"a{adapter.lora_id}"
        method = Manifest.read(adapter.path).method
        if method in PROMPT_METHODS:
            # Loaded outside the lock: llama_adapter's own base copy takes a while, and touches no shared state.
            own = self._fresh_base() if method == "llama_adapter" else None
            with self._lock:
                pm = PeftModel.from_pretrained(own if own is not None else self.base, adapter.path, adapter_name=name)
                self.prompt_models[adapter.lora_id] = pm.eval()
            return
        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(adapter.path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=name)
            self.model.eval()
            self.adapters[adapter.lora_id] = name

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        def _drop():
            with self._lock:
                self.prompt_models.pop(adapter.lora_id, None)
                name = self.adapters.pop(adapter.lora_id, None)
                if name is not None:
                    self.model.delete_adapter(name)
        await asyncio.to_thread(_drop)

    async def generate(self, request_id: str, prompt_ids: list[int], params: GenParams,
                       adapter: AdapterRef | None) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work():
            try:
                with self._lock:
                    self._decode(prompt_ids, params, adapter, emit, cancelled)
            except BaseException as exc:  # surfaced to the awaiting request
                emit(exc)
            emit(None)

        threading.Thread(target=work, name=f"hf-{request_id}", daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def _stepper(self, adapter: AdapterRef | None):
        """(the context to decode in, one forward step) for `adapter`: a prompt method's own model with the
        LoRA layers off, a LoRA adapter made active on the shared model, or the base with the LoRA layers off."""
        from peft import PeftModel

        model = self.model
        lora_off = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
        if adapter is not None and adapter.lora_id in self.prompt_models:
            return lora_off, _prompt_step(self.prompt_models[adapter.lora_id])

        def step(ids, past):
            return model(input_ids=ids, past_key_values=past, use_cache=True)

        if adapter is not None:
            model.set_adapter(self.adapters[adapter.lora_id])
            return contextlib.nullcontext(), step
        return lora_off, step

    def _decode(self, prompt_ids, params: GenParams, adapter, emit, cancelled) -> None:
        import torch

        model, tok = self.model, self.tokenizer
        ctx, step = self._stepper(adapter)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        ids = torch.tensor([prompt_ids], device=model.device)
        out_ids: list[int] = []
        sent = ""
        past = None
        ends = set(params.stop_token_ids)  # the format's end of turn: this model's EOS
        stop_ids = set() if params.ignore_eos else ends
        shape = _processors(params, len(prompt_ids), (ends | {tok.eos_token_id}) - {None}, model.device)
        warp = _warpers(params)
        floor = 0  # stop strings count from the end of the first min_tokens tokens, as in vLLM
        with ctx, torch.no_grad():
            for _ in range(params.max_tokens):
                if cancelled.is_set():
                    return
                res = step(ids, past)
                past = res.past_key_values
                logits = res.logits[0, -1].float()
                if shape:
                    seen = torch.tensor([prompt_ids + out_ids], device=logits.device)
                    logits = shape(seen, logits[None])[0]
                nxt = _sample(logits, params, gen, warp)
                if nxt in stop_ids:
                    emit(Delta("", len(out_ids), "stop"))
                    return
                out_ids.append(nxt)
                text = tok.decode(out_ids, skip_special_tokens=params.skip_special_tokens)
                if len(out_ids) == params.min_tokens:
                    floor = len(text)
                hit = _stop_at(text, params.stop, floor) if len(out_ids) > params.min_tokens else -1
                if hit >= 0:
                    text = text[:hit]
                    emit(Delta(text[len(sent):], len(out_ids), "stop"))
                    return
                # Hold back a tail that could still become a stop string, and half-decoded bytes.
                safe = len(text) - max((len(s) - 1 for s in params.stop), default=0)
                if text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                if safe > len(sent):
                    emit(Delta(text[len(sent):safe], len(out_ids)))
                    sent = text[:safe]
                ids = torch.tensor([[nxt]], device=model.device)
        emit(Delta(tok.decode(out_ids, skip_special_tokens=params.skip_special_tokens)[len(sent):], len(out_ids),
                   "length"))

    async def shutdown(self) -> None:
        self.model = None


def _prompt_step(pm):
    """One decode step for a PEFT model whose adapter lives in its inputs or its cache.

    PeftModel.forward re-adds the virtual tokens on every call, which is right for training and for
    `generate` (which patches its input preparation) but wrong for a step-by-step KV-cache loop: here
    the first step adds them, the cache carries them, and later steps feed only the new token.
    """
    import torch
    from peft import PeftType

    kind = pm.active_peft_config.peft_type
    if kind == PeftType.ADAPTION_PROMPT:  # lives in the attention modules: a plain step is right
        return lambda ids, past: pm(input_ids=ids, past_key_values=past, use_cache=True)
    base = pm.get_base_model()

    def step(ids, past):
        if past is not None:
            return base(input_ids=ids, past_key_values=past, use_cache=True)
        if kind == PeftType.PREFIX_TUNING:  # trained prefixes pre-fill every layer's cache
            return base(input_ids=ids, past_key_values=pm.get_prompt(batch_size=1), use_cache=True)
        embeds = pm.word_embeddings(ids)  # prompt_tuning, p_tuning: virtual tokens before the prompt
        virtual = pm.get_prompt(batch_size=1).to(embeds.dtype)
        return base(inputs_embeds=torch.cat([virtual, embeds], dim=1), use_cache=True)
    return step


def _stop_at(text: str, stops: list[str], start: int) -> int:
    """Where the first stop string in `text[start:]` begins; -1 for none."""
    return min((i for s in stops if (i := text.find(s, start)) >= 0), default=-1)


def _processors(params: GenParams, prompt_len: int, ends: set[int], device):
    """What transformers' `generate` applies for repetition_penalty and min_new_tokens, greedy or not.
    `ends`: every token that ends a reply, kept out until min_tokens are out (as vLLM does)."""
    from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    procs = LogitsProcessorList()
    if params.min_tokens and ends:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, params.min_tokens, sorted(ends), device=str(device)))
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    return procs


def _warpers(params: GenParams):
    """min_p then top_k, after the temperature (vLLM's order); greedy decoding skips them, as in vLLM."""
    from transformers import LogitsProcessorList, MinPLogitsWarper, TopKLogitsWarper

    warp = LogitsProcessorList()
    if params.min_p > 0:
        warp.append(MinPLogitsWarper(params.min_p))
    if params.top_k > 0:
        warp.append(TopKLogitsWarper(params.top_k))
    return warp


def _sample(logits, params: GenParams, gen, warp) -> int:
    import torch

    if params.temperature == 0:
        return int(torch.argmax(logits))
    # vLLM's floor: a smaller temperature overflows float32. So may an extreme repetition_penalty: then the
    # largest finite logit wins, not a NaN.
    logits = torch.nan_to_num(logits / max(params.temperature, 0.01))
    if warp:
        logits = warp(None, logits[None])[0]
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
