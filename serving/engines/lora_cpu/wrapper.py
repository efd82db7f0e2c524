"""Per-step grouping and packed weights for vLLM's CPU punica wrapper (`PunicaWrapperCPU`).

vLLM's wrapper runs, for every LoRA projection of the model (210 in SmolLM2 with all-linear LoRA),
a zero-filled buffer per slice, then a shrink and an expand op per slice, each re-reading the batch's
indices, at the engine's max rank rather than the adapter's. Here:

- the rows of each adapter are found once per step, in `update_metadata`;
- each (projection, slot) keeps its slices' weights packed, at the adapter's own rank: A of all
  slices as one [in, R] matrix, B as one block-diagonal [R, out] matrix; rebuilt when vLLM writes
  new weights into the slot (the tensors' version counters change);
- so `add_lora_linear` is two matmuls per adapter present, `y[rows] += (x[rows] @ A) @ B * scale`,
  and a batch with no adapter does no LoRA work at all.

Logits and embeddings still go through the ops in `ops`.
"""

from __future__ import annotations

import weakref

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from serving.engines.lora_cpu import ops

VLLM_UPDATE_METADATA = PunicaWrapperCPU.update_metadata
VLLM_ADD_LORA_LINEAR = PunicaWrapperCPU.add_lora_linear

Packed = tuple[torch.Tensor, torch.Tensor] | None  # (A [in, R], B [R, out]); None: the slot is empty
_packed: dict[tuple[int, int], tuple[weakref.ref, tuple[int, ...], Packed]] = {}


def update_metadata(self, *args, **kwargs) -> None:
    VLLM_UPDATE_METADATA(self, *args, **kwargs)
    self.guardtune_groups = ops.groups(self.token_lora_indices)[0]


def _rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """The adapter's own rank in a slot padded to the engine's max rank: the rows of A (columns of B)
    up to the last non-zero one."""
    used = (a.abs().amax(dim=1) > 0) | (b.abs().amax(dim=0) > 0)
    nz = torch.nonzero(used)
    return int(nz[-1]) + 1 if len(nz) else 0


def _pack(a_stacked, b_stacked, slot: int, sizes: tuple[int, ...]) -> Packed:
    a_parts, b_parts = [], []
    for a, b, size in zip(a_stacked, b_stacked, sizes):
        a_s, b_s = ops.stacked(a)[slot], ops.stacked(b)[slot]
        r = _rank(a_s, b_s)
        a_parts.append(a_s[:r].to(torch.float32))
        b_parts.append(b_s[:size, :r].to(torch.float32))
    ranks = [p.shape[0] for p in a_parts]
    if not sum(ranks):
        return None
    b = torch.zeros(sum(ranks), sum(sizes), dtype=torch.float32)
    row = col = 0
    for part, r, size in zip(b_parts, ranks, sizes):
        b[row:row + r, col:col + size] = part.T
        row, col = row + r, col + size
    return torch.cat(a_parts).T.contiguous(), b


def packed(a_stacked, b_stacked, slot: int, sizes: tuple[int, ...]) -> Packed:
    """The slot's weights packed, cached until vLLM writes into any of its tensors (their version
    counters change); the weak reference tells a reused id() from the tensor it was built for."""
    first = a_stacked[0]
    key = (id(first), slot)
    versions = tuple(t._version for t in (*a_stacked, *b_stacked))
    hit = _packed.get(key)
    if hit is None or hit[0]() is not first or hit[1] != versions:
        hit = (weakref.ref(first), versions, _pack(a_stacked, b_stacked, slot, sizes))
        _packed[key] = hit
    return hit[2]


def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                    lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...], *,
                    buffer=None, **kwargs) -> None:
    found = getattr(self, "guardtune_groups", None)
    if found is None:  # metadata set by a path this module did not see: vLLM's own method
        return VLLM_ADD_LORA_LINEAR(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                    buffer=buffer, **kwargs)
    x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    width = sum(output_slices)
    for slot, rows in found:
        weights = packed(lora_a_stacked, lora_b_stacked, slot, output_slices)
        if weights is None:
            continue
        a, b = weights
        shrunk = x2[rows].to(torch.float32) @ a  # float32, as vLLM's shrink buffer is
        if isinstance(rows, slice) and y2.dtype == torch.float32:
            y2[:, :width].addmm_(shrunk, b, alpha=scale)
        else:
            y2[rows, :width] += (shrunk @ b).mul_(scale).to(y2.dtype)
    return None
