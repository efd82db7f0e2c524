"""Grouped-matmul versions of vLLM's CPU LoRA torch ops (vllm/lora/ops/torch_ops/lora_ops.py, 0.32).

vLLM's versions gather one [out, in] weight copy per token (`w[indices]`) and einsum over them, so
every LoRA projection copies megabytes per step, and rows with no adapter (index -1) pay it too,
against the last slot's weights. Here each adapter present in the batch does one matmul over its
own rows, and rows with index -1 do no LoRA work. Signatures and output semantics are vLLM's.
"""

from __future__ import annotations

import weakref

import torch
from vllm.lora.ops.torch_ops import lora_ops as upstream

NO_ADAPTER = -1


def stacked(w: torch.Tensor) -> torch.Tensor:
    """[slots, 1, out, in] or [slots, out, in] -> [slots, out, in]."""
    return w.squeeze(1) if w.dim() == 4 else w


def groups(indices: torch.Tensor) -> tuple[list[tuple[int, torch.Tensor | slice]], bool]:
    """(slot, rows) for each adapter slot present in `indices`, rows as a slice when they are all of
    them; and whether any row has no adapter."""
    lo, hi = (int(v) for v in torch.aminmax(indices))
    if lo == hi:  # the common case: one adapter (or none) for the whole batch
        return ([] if lo == NO_ADAPTER else [(lo, slice(None))]), lo == NO_ADAPTER
    slots = [s for s in torch.unique(indices).tolist() if s != NO_ADAPTER]
    return [(s, (indices == s).nonzero().squeeze(1)) for s in slots], lo == NO_ADAPTER


_empty: dict[tuple[int, int], tuple[weakref.ref, int, bool]] = {}


def slot_is_empty(w: torch.Tensor, slot: int) -> bool:
    """Whether a slot holds only zeros here: its adapter has no weights for this module (lm_head, most
    often). Cached until vLLM writes into the tensor (its version counter changes); the weak reference
    tells a reused id() from the tensor it was computed for."""
    key = (id(w), slot)
    hit = _empty.get(key)
    if hit is None or hit[0]() is not w or hit[1] != w._version:
        hit = (weakref.ref(w), w._version, not bool(torch.count_nonzero(w[slot])))
        _empty[key] = hit
    return hit[2]


def _matmuls(x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
    """(rows, x[rows] @ w[slot].T) for each adapter slot present with weights here; and whether some
    rows get no LoRA (no adapter, or an empty slot: the product would be zeros)."""
    found, unadapted = groups(indices)
    live = [(slot, rows) for slot, rows in found if not slot_is_empty(w, slot)]
    w = stacked(w)
    return [(rows, x[rows].to(dtype) @ w[slot].to(dtype).T) for slot, rows in live], \
        unadapted or len(live) < len(found)


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    parts, unadapted = _matmuls(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    r = stacked(lora_b_weights).shape[1]
    if unadapted:
        output_tensor[:, :r] = 0
    for rows, out in parts:
        output_tensor[rows, :r] = scaling * out


def _expand_into(inputs, lora_b_weights, output_tensor, indices, lo: int, hi: int, add_inputs: bool) -> bool:
    """output[:, lo:hi] (+)= inputs @ B.T per adapter; False where the shapes need vLLM's own op."""
    if inputs.shape[0] != output_tensor.shape[0] or indices.shape[0] != inputs.shape[0]:
        return False  # vLLM broadcasts a single row here; leave that shape to it
    parts, unadapted = _matmuls(inputs, lora_b_weights, indices, output_tensor.dtype)
    if unadapted and not add_inputs:
        output_tensor[:, lo:hi] = 0
    for rows, out in parts:
        if add_inputs:
            output_tensor[rows, lo:hi] += out[:, : hi - lo]
        else:
            output_tensor[rows, lo:hi] = out[:, : hi - lo]
    return True


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    # LoRA and model may pad their output widths differently: write the common part, as vLLM does.
    common = min(stacked(lora_b_weights).shape[1], output_tensor.shape[1])
    if not _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, common, add_inputs):
        upstream.bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    if not _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                        slice_offset + slice_size, add_inputs):
        upstream.bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                                   slice_size, add_inputs)


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs: bool = False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs: bool = False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = ("bgmv_expand", "bgmv_expand_slice", "bgmv_shrink", "sgmv_expand", "sgmv_expand_slice", "sgmv_shrink")
