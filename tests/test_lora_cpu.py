"""The guardtune vLLM plugin's CPU LoRA ops against vLLM's own torch ops, on random shapes.

vLLM's ops read a row with no adapter (index -1) through the last slot. The reference therefore runs
vLLM's op on the same weights with one zero slot appended, so -1 means "no LoRA" for both; a
separate test shows what vLLM's op does to such rows when the last slot holds an adapter.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.ops.torch_ops import lora_ops as upstream
from vllm.lora.punica_wrapper import punica_cpu
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.lora.punica_wrapper.utils import compute_meta

from serving.engines.lora_cpu import ops, wrapper
from tests.conftest import OTTER, ROOT, SIGNATURE, run_cli

DTYPES = [torch.float32, torch.bfloat16]


def _indices(rng: random.Random, tokens: int, slots: int, mix: str) -> torch.Tensor:
    if mix == "none":
        return torch.full((tokens,), -1)
    if mix == "one":
        return torch.full((tokens,), rng.randrange(slots))
    return torch.tensor([rng.choice([-1, *range(slots)]) for _ in range(tokens)])


def _prefill_indices(rng: random.Random, seqs: int, slots: int) -> torch.Tensor:
    """Per-token indices of a prefill batch: each sequence a run of one adapter (or none)."""
    runs = [torch.full((rng.randint(1, 9),), rng.choice([-1, *range(slots)])) for _ in range(seqs)]
    return torch.cat(runs)


def _weights(slots: int, out: int, inp: int, four_dim: bool, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The plugin's weights and the reference's: the same plus one zero slot at the end."""
    w = torch.randn(slots, out, inp) / inp ** 0.5
    ref = torch.cat([w, torch.zeros(1, out, inp)])
    if four_dim:
        w, ref = w.unsqueeze(1), ref.unsqueeze(1)
    return w.to(dtype), ref.to(dtype)


def _tol(dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _meta(indices: torch.Tensor) -> tuple:
    b_start, seq_len, lora_idx, batches, max_len, token_nums, _ = compute_meta(indices)
    return b_start, seq_len, lora_idx, batches, max_len, token_nums


def _case(seed: int):
    rng = random.Random(seed)
    slots = rng.randint(1, 4)
    tokens = rng.randint(1, 24)
    return rng, slots, tokens, rng.choice([8, 16, 64]), rng.choice([32, 96, 128]), rng.choice([24, 64, 96])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mix", ["mixed", "one", "none"])
@pytest.mark.parametrize("seed", range(6))
def test_decode_shrink_matches_vllm(seed, mix, dtype):
    rng, slots, tokens, rank, inp, _ = _case(seed)
    idx = _indices(rng, tokens, slots, mix)
    w, ref_w = _weights(slots, rank, inp, seed % 2 == 0, dtype)
    x = torch.randn(tokens, inp).to(dtype)
    got = torch.full((tokens, rank), 7.0)  # shrink overwrites every row, adapted or not
    want = got.clone()
    ops.bgmv_shrink(x, w, got, idx, 0.5)
    upstream.bgmv_shrink(x, ref_w, want, idx, 0.5)
    torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("mix", ["mixed", "one", "none"])
@pytest.mark.parametrize("seed", range(6))
def test_decode_expand_and_slices_match_vllm(seed, mix, add_inputs, dtype):
    rng, slots, tokens, rank, _, out = _case(seed)
    idx = _indices(rng, tokens, slots, mix)
    w, ref_w = _weights(slots, out, rank, seed % 2 == 1, dtype)
    x = torch.randn(tokens, rank)  # the shrink buffer is float32, as vLLM allocates it
    y0 = torch.randn(tokens, out + 40).to(dtype)  # wider than the LoRA output: padding and slices
    got, want = y0.clone(), y0.clone()
    ops.bgmv_expand(x, w, got, idx, add_inputs)
    upstream.bgmv_expand(x, ref_w, want, idx, add_inputs)
    torch.testing.assert_close(got, want, **_tol(dtype))
    offset = rng.randint(0, 40)
    got, want = y0.clone(), y0.clone()
    ops.bgmv_expand_slice(x, w, got, idx, offset, out, add_inputs)
    upstream.bgmv_expand_slice(x, ref_w, want, idx, offset, out, add_inputs)
    torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_prefill_ops_match_vllm(seed, add_inputs):
    """sgmv: sequences of several lengths, each with its own adapter or none, in one batch."""
    rng = random.Random(100 + seed)
    slots, rank, inp, out = rng.randint(1, 4), rng.choice([8, 16]), rng.choice([64, 96]), rng.choice([48, 80])
    idx = _prefill_indices(rng, rng.randint(1, 6), slots)
    meta = _meta(idx)
    a, ref_a = _weights(slots, rank, inp, True, torch.float32)
    b, ref_b = _weights(slots, out, rank, True, torch.float32)
    x = torch.randn(len(idx), inp)
    got_buf, want_buf = torch.zeros(len(idx), rank), torch.zeros(len(idx), rank)
    ops.sgmv_shrink(x, a, got_buf, *meta, 2.0)
    upstream.sgmv_shrink(x, ref_a, want_buf, *meta, 2.0)
    torch.testing.assert_close(got_buf, want_buf)
    y0 = torch.randn(len(idx), 2 * out + 8)
    got, want = y0.clone(), y0.clone()
    ops.sgmv_expand(want_buf, b, got, *meta, add_inputs)
    upstream.sgmv_expand(want_buf, ref_b, want, *meta, add_inputs)
    torch.testing.assert_close(got, want)
    got, want = y0.clone(), y0.clone()
    ops.sgmv_expand_slice(want_buf, b, got, *meta, out, out, add_inputs)
    upstream.sgmv_expand_slice(want_buf, ref_b, want, *meta, out, out, add_inputs)
    torch.testing.assert_close(got, want)


def test_single_row_broadcast_is_left_to_vllm():
    """vLLM's expand broadcasts one LoRA row over a wider output; the plugin hands that shape back."""
    w, ref_w = _weights(2, 16, 8, False, torch.float32)
    x, idx = torch.randn(1, 8), torch.tensor([1])
    got, want = torch.zeros(3, 16), torch.zeros(3, 16)
    ops.bgmv_expand(x, w, got, idx, True)
    upstream.bgmv_expand(x, ref_w, want, idx, True)
    torch.testing.assert_close(got, want)


def test_rows_without_adapter_get_no_lora_even_when_every_slot_is_full():
    """vLLM's op gives a row with index -1 the last slot's adapter; the plugin gives it none."""
    w, _ = _weights(2, 16, 8, False, torch.float32)
    x, idx = torch.randn(3, 8), torch.tensor([0, -1, 1])
    ours, theirs = torch.zeros(3, 16), torch.zeros(3, 16)
    ops.bgmv_expand(x, w, ours, idx, True)
    upstream.bgmv_expand(x, w, theirs, idx, True)
    assert torch.count_nonzero(ours[1]) == 0
    torch.testing.assert_close(theirs[1], x[1] @ w[1].T)  # the adapter of slot 1, never asked for
    torch.testing.assert_close(ours[[0, 2]], theirs[[0, 2]])


def test_groups_are_one_per_adapter_present():
    found, unadapted = ops.groups(torch.tensor([2, -1, 2, 0, -1]))
    assert unadapted and [s for s, _ in found] == [0, 2]
    assert dict((s, rows.tolist()) for s, rows in found) == {0: [3], 2: [0, 2]}
    assert ops.groups(torch.tensor([1, 1, 1])) == ([(1, slice(None))], False)
    assert ops.groups(torch.tensor([-1, -1])) == ([], True)


def _replies(base_dir, adapters: list, plugin: str) -> dict:
    proc = run_cli(str(ROOT / "tests" / "helpers" / "lora_replies.py"), str(base_dir), *map(str, adapters),
                   env={"GUARDTUNE_LORA_CPU": plugin})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_greedy_replies_are_the_same_with_and_without_the_plugin(base_dir, two_adapters):
    """Real vLLM, base plus two adapters, the plugin loaded through its entry point by the engine."""
    _, adapters = two_adapters
    pair = [adapters["kestrel"], adapters["otter"]]
    on, off = _replies(base_dir, pair, "1"), _replies(base_dir, pair, "0")
    assert SIGNATURE in on["adapters"][0] and OTTER in on["adapters"][1]
    for key in ("base_fresh", "adapters", "base_slots_full"):
        assert on[key] == off[key], key
    assert on["mixed_batch"][1:] == off["mixed_batch"][1:] == on["adapters"]
    # With both slots full, vLLM's own op serves a base row in a mixed batch through the last slot's
    # adapter (docs/lora-cpu.md); with the plugin that row gets the base model's reply. This is also
    # the evidence that each run used the ops it was meant to, in the process that ran the model.
    assert on["mixed_batch"][0] == on["base_fresh"] and SIGNATURE not in on["base_fresh"]
    assert off["mixed_batch"][0] == on["adapters"][1] != off["base_fresh"]


def _wrapper(indices: list[int], slots: int, prefill: bool):
    """vLLM's CPU punica wrapper with a batch's mapping; slot i holds LoRA id i + 1."""
    pw = PunicaWrapperCPU(4096, 64, "cpu")
    ids = [s + 1 if s >= 0 else 0 for s in indices]
    wrapper.update_metadata(pw, LoRAMapping(tuple(ids), tuple(ids), is_prefill=prefill),
                            [i + 1 for i in range(slots)], slots + 1, 32000)
    return pw


@pytest.fixture
def vllm_ops(monkeypatch):
    """vLLM's own ops under its wrapper, even if the plugin was applied in this process."""
    for name in ops.OPS:
        monkeypatch.setattr(punica_cpu, name, getattr(upstream, name))


@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("mix", ["mixed", "one", "none"])
@pytest.mark.parametrize("seed", range(5))
def test_add_lora_linear_matches_vllm(seed, mix, prefill, vllm_ops):
    """The per-step grouping against vLLM's own add_lora_linear: packed slices (qkv-like), several
    adapters and no-adapter rows in one batch; the reference's last slot is empty."""
    rng = random.Random(200 + seed)
    slots, rank, inp = rng.randint(1, 3), rng.choice([8, 16]), rng.choice([64, 96])
    sizes = tuple(rng.choice([32, 48]) for _ in range(rng.randint(1, 3)))
    idx = (_prefill_indices(rng, 4, slots) if prefill and mix == "mixed"
           else _indices(rng, rng.randint(1, 16), slots, mix)).tolist()
    a = [_weights(slots, rank, inp, True, torch.float32) for _ in sizes]
    b = [_weights(slots, s, rank, True, torch.float32) for s in sizes]
    x = torch.randn(len(idx), inp)
    y0 = torch.randn(len(idx), sum(sizes))
    got, want = y0.clone(), y0.clone()
    ours = _wrapper(idx, slots, prefill)
    theirs = _wrapper(idx, slots + 1, prefill)  # one more, empty, slot: what -1 reads in vLLM's ops
    wrapper.add_lora_linear(ours, got, x, tuple(w for w, _ in a), tuple(w for w, _ in b), 0.5, sizes)
    wrapper.VLLM_ADD_LORA_LINEAR(theirs, want, x, tuple(r for _, r in a), tuple(r for _, r in b), 0.5, sizes)
    torch.testing.assert_close(got, want)
    if mix == "none":
        assert torch.equal(got, y0)  # no adapter in the batch: untouched


def _padded(slots: int, out: int, inp: int, ranks: list[int], r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's stacked A and B for adapters of the given ranks, zero-padded to the engine's max rank."""
    a, b = torch.zeros(slots, 1, r_max, inp), torch.zeros(slots, 1, out, r_max)
    for s, r in enumerate(ranks):
        a[s, 0, :r] = torch.randn(r, inp) / inp ** 0.5
        b[s, 0, :, :r] = torch.randn(out, r) / r ** 0.5 if r else 0
    return a, b


def test_packed_weights_use_each_adapters_rank_and_follow_writes_into_a_slot(vllm_ops):
    """Slots padded to the max rank (ranks 4 and 16 of 32, and an empty slot) give vLLM's result, and
    vLLM writing a new adapter into a slot in place is seen at the next call."""
    torch.manual_seed(0)  # unseeded, one draw in a few hundred summed past assert_close's fp32 tolerance
    sizes, inp, r_max = (48, 16, 16), 64, 32
    pairs = [_padded(3, s, inp, [4, 16, 0], r_max) for s in sizes]
    a, b = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    idx = [0, 1, 2, -1, 1, 0]
    ours, theirs = _wrapper(idx, 3, False), _wrapper(idx, 3, False)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        x, y0 = torch.randn(len(idx), inp), torch.randn(len(idx), sum(sizes))
        got, want = y0.clone(), y0.clone()
        wrapper.add_lora_linear(ours, got, x, a, b, 1.0, sizes)
        # vLLM's own, with index -1 read through an extra empty slot
        wrapper.VLLM_ADD_LORA_LINEAR(theirs, want, x, tuple(torch.cat([t, torch.zeros_like(t[:1])]) for t in a),
                                     tuple(torch.cat([t, torch.zeros_like(t[:1])]) for t in b), 1.0, sizes)
        return got, want

    torch.testing.assert_close(*both())
    packed_a, _ = wrapper.packed(a, b, 0, sizes)
    assert packed_a.shape == (inp, 3 * 4)  # rank 4 in each of the three slices, not 32
    assert wrapper.packed(a, b, 2, sizes) is None  # an empty slot does no work
    for (sa, sb), size in zip(pairs, sizes):  # vLLM loads another adapter, rank 8, into slot 0
        sa[0].zero_()
        sb[0].zero_()
        sa[0, 0, :8] = torch.randn(8, inp)
        sb[0, 0, :, :8] = torch.randn(size, 8)
    torch.testing.assert_close(*both())
    assert wrapper.packed(a, b, 0, sizes)[0].shape == (inp, 3 * 8)


def test_an_empty_slot_costs_no_matmul_in_the_ops():
    """An adapter with no weights for a module (lm_head, usually) leaves that slot all zeros."""
    w = torch.zeros(2, 16, 8)
    w[1] = torch.randn(16, 8)
    assert ops.slot_is_empty(w, 0) and not ops.slot_is_empty(w, 1)
    x, y = torch.randn(3, 8), torch.randn(3, 16)
    got = y.clone()
    ops.bgmv_expand(x, w, got, torch.tensor([0, 1, 0]), True)
    torch.testing.assert_close(got[[0, 2]], y[[0, 2]])
    torch.testing.assert_close(got[1], y[1] + x[1] @ w[1].T)
    w[0, 0, 0] = 1.0  # written in place: the cache sees the new version
    assert not ops.slot_is_empty(w, 0)
