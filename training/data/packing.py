"""SFT packing: several short conversations per row, each still seeing only itself.

A packed row concatenates conversations whose lengths fit `max_length` (best-fit decreasing) and
carries `position_ids` that restart at 0 for each one. The batch has no `attention_mask`:
transformers (5.x, `masking_utils.find_packed_sequence_indices`) then reads the position-id resets
as sequence boundaries and builds a block-diagonal causal mask for eager and sdpa attention, and
flash-attention uses the same resets for its varlen kernels. That detection is skipped when a KV
cache is passed, so the collator sends `use_cache=False` (training never needs one). Under those
conditions the logits of a packed conversation equal its logits alone (tests/test_data_stages.py).

Each conversation's label mask is kept, except that its first label is set to -100: nothing precedes
that token in the conversation, so alone it is never a target either; packed, it would otherwise
be predicted from the previous conversation's last token.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from training.data.processor import IGNORE, Example


def pack(examples: list[Example], max_length: int) -> dict[str, list[np.ndarray]]:
    """Rows of input_ids/labels/position_ids, each at most max_length tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: best fit is the first with enough room
    for i in order:
        n = len(examples[i].input_ids)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
    out: dict[str, list[np.ndarray]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in bins:
        parts = [examples[i] for i in members]
        labels = np.concatenate([np.asarray(ex.labels, dtype=np.int32) for ex in parts])
        starts = np.cumsum([0] + [len(ex.input_ids) for ex in parts[:-1]])
        labels[starts] = IGNORE
        out["input_ids"].append(np.concatenate([np.asarray(ex.input_ids, dtype=np.int32) for ex in parts]))
        out["labels"].append(labels)
        out["position_ids"].append(np.concatenate([np.arange(len(ex.input_ids), dtype=np.int32) for ex in parts]))
    return out


class PackedCollator:
    """Pads packed rows to the batch's longest; the padding is one more segment, never trained."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.multiple) * self.multiple
        ids, labels, pos = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE] * pad)
            pos.append(list(f["position_ids"]) + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(pos), "use_cache": False}


def collator_for(cfg, tokenizer):
    """The trainer's data collator: packed rows, or plain rows padded per batch."""
    if cfg.stage == "sft" and cfg.packing:
        return PackedCollator(tokenizer.pad_token_id)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE, pad_to_multiple_of=8)
