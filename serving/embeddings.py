"""POST /v1/embeddings: the packaged all-MiniLM-L6-v2 and any encoder in `embeddings:`, in the shape vLLM's
own server answers (tests/test_embeddings.py compares the two).

No text is generated, so the guardrails' input moderation does not apply: a request meets the keys, the
size limits and a bounded queue. The encoder runs in the server process, independent of the engine, so
embeddings are served while the engine starts or restarts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid

import numpy as np
from fastapi.responses import JSONResponse, Response

from kernel import encoder
from serving.errors import APIError
from serving.limits import Admission
from serving.protocol import EmbeddingRequest

# Inputs per encode call. The packaged encoder's lock is shared with the guard scanners (kernel/encoder.py):
# a chat request's scan gets in between chunks, not after a whole 2,048-input request. 16 inputs of 256
# tokens held it for 2.9 s on 2 busy cores.
CHUNK = 16
log = logging.getLogger("guardtune.serve")


class EmbeddingService:
    def __init__(self, state):
        self.s = state  # serving.state.ServerState
        self.models = state.cfg.embedding_models()  # model id -> directory (None: the packaged encoder)
        limits = state.cfg.limits
        # Encodes run one at a time anyway (one lock per process), so one runs and the rest wait in a queue
        # bounded like chat's: a flood gets 429s, holds at most one worker thread, and takes none of the
        # engine's generation slots (moderation shares those, as it guards chat; embeddings do not).
        self.admission = Admission(1, limits.max_queue, limits.queue_timeout_s)

    async def handle(self, body: EmbeddingRequest) -> Response:
        if body.model not in self.models:
            raise APIError(404, f"The model `{body.model}` does not exist; embedding models here: "
                                f"{', '.join(self.models)}", param="model", code="model_not_found")
        inputs = body.inputs()
        cap = self.s.cfg.limits.max_input_chars
        texts = [i for i in inputs if isinstance(i, str)]
        if texts and (longest := max(map(len, texts))) > cap:  # before any tokenizing
            raise APIError(400, f"an input holds {longest} characters; this server takes up to {cap}",
                           param="input", code="input_too_long")
        path = self.models[body.model]
        path = None if path is None else str(path)
        async with self.admission.slot():
            info = await self._info(body.model, path)
            check_dimensions(body, info)
            try:  # the body cap bounds the work; this bounds its time (checked between chunks)
                async with asyncio.timeout(self.s.cfg.limits.request_timeout_s):
                    vecs, counts = await self._encode(inputs, path, info)
            except TimeoutError:
                raise APIError(504, "embedding timed out", code="timeout") from None
        if body.dimensions is not None:  # vLLM's order: cut, then normalise
            vecs = vecs[:, :body.dimensions]
            vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        # 2,048 vectors are about 16 MB of JSON: written in a worker thread, not on the event loop
        content = await asyncio.to_thread(lambda: JSONResponse(response_body(body, vecs, counts)).body)
        return Response(content, media_type="application/json")

    @staticmethod
    async def _info(model: str, path: str | None) -> encoder.EncoderInfo:
        try:
            return await in_thread(encoder.info, path)  # loads the encoder on its first request
        except Exception as exc:  # noqa: BLE001 - a configured directory that is not a sentence encoder
            log.error("embedding model %s failed to load: %s: %s", model, type(exc).__name__, exc)
            raise APIError(503, f"embedding model {model!r} could not be loaded (see the server log)",
                           code="model_unavailable") from None

    async def _encode(self, inputs: list, path: str | None, info: encoder.EncoderInfo):
        if isinstance(inputs[0], list):
            check_token_ids(inputs, info)
        vecs, counts = [], []
        for at in range(0, len(inputs), CHUNK):
            chunk = inputs[at:at + CHUNK]
            if isinstance(chunk[0], str):
                v, c = await in_thread(encoder.encode_texts, chunk, path)
            else:
                v, c = await in_thread(encoder.encode_ids, chunk, path), [len(ids) for ids in chunk]
            vecs.append(v)
            counts += c
        return np.concatenate(vecs), counts


async def in_thread(fn, *args):
    """`fn` in a worker thread. A request cancelled meanwhile (its client left) still waits for the call
    to end, at most one chunk, so its queue slot is not handed on while its thread works."""
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait([call])
        raise


def check_dimensions(body: EmbeddingRequest, info: encoder.EncoderInfo) -> None:
    """vLLM's rules (PoolingParams): only a Matryoshka model takes `dimensions`, within its size and, when
    its config lists them, one of its Matryoshka dimensions."""
    d = body.dimensions
    if d is None:
        return
    if not info.matryoshka:
        raise APIError(400, f"Model {body.model!r} does not support Matryoshka embeddings; dimensions must be "
                            f"unset (received dimensions={d}).", param="dimensions")
    if not 1 <= d <= info.dimensions:
        raise APIError(400, f"Model {body.model!r} only supports dimensions in range [1, {info.dimensions}], "
                            f"got {d}.", param="dimensions")
    if info.matryoshka_dimensions is not None and d not in info.matryoshka_dimensions:
        raise APIError(400, f"Model {body.model!r} only supports Matryoshka dimensions "
                            f"{list(info.matryoshka_dimensions)}, got {d}.", param="dimensions")


def check_token_ids(inputs: list[list[int]], info: encoder.EncoderInfo) -> None:
    """Token ids are embedded as given, so, as in vLLM, they must be in the vocabulary and fit the model:
    a too-long list is refused, not cut (a text is cut where the tokenizer cuts it)."""
    for i, ids in enumerate(inputs):
        if len(ids) > info.max_tokens:
            raise APIError(400, f"input {i} holds {len(ids)} tokens; this model reads up to {info.max_tokens}",
                           param="input", code="input_too_long")
        if (top := max(ids)) >= info.vocab_size:
            raise APIError(400, f"Token id {top} is out of vocabulary (input {i})", param="input")


def response_body(body: EmbeddingRequest, vecs: np.ndarray, counts: list[int]) -> dict:
    """vLLM's EmbeddingResponse, field for field; base64 is the little-endian float32 bytes, as OpenAI sends."""
    if body.encoding_format == "base64":
        out = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vecs]
    else:
        out = vecs.tolist()  # each float32 exactly, as a JSON number
    tokens = sum(counts)
    return {"id": f"embd-{uuid.uuid4().hex[:16]}", "object": "list", "created": int(time.time()),
            "model": body.model,
            "data": [{"index": i, "object": "embedding", "embedding": e} for i, e in enumerate(out)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None, "completion_tokens_details": None}}
