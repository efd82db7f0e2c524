"""Stage pt (continued pretraining): raw text -> full blocks of `block_size` tokens, every token trained.

Documents are tokenised without special tokens, each followed by the tokenizer's EOS, concatenated
and cut into blocks. Attention runs across the EOS inside a block, as in standard causal-LM
pretraining; the EOS tells the model where one document ends. The tail shorter than a block is
dropped (and counted): blocks are cut per shard, so at most one partial block per shard is lost.
"""

from __future__ import annotations

import numpy as np

from kernel.errors import GuardtuneError


def text_blocks(tokenizer, docs: list[str], block_size: int, batch: int = 1000) -> tuple[list[np.ndarray], int]:
    """(blocks, dropped tail tokens) for one shard of documents."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GuardtuneError("stage pt needs a tokenizer with an EOS token to separate documents")
    parts = []
    for i in range(0, len(docs), batch):
        for ids in tokenizer(docs[i:i + batch], add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + [eos], dtype=np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    n = len(stream) // block_size
    return list(stream[: n * block_size].reshape(n, block_size)), len(stream) - n * block_size
