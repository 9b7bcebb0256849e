"""Packed attention backends against the explicit-softmax reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cprec_kernels import packed_attention
from cprec_kernels.loop import packed_attention_loop
from cprec_kernels.reference import packed_attention_reference
from cprec_kernels.sdpa import block_diagonal_causal_mask, packed_attention_sdpa
from cprec_kernels.segments import check_bounds, random_bounds, segment_ids

CPU_BACKENDS = ["sdpa", "loop", "reference"]


def qkv(batch, heads, kv_heads, seq_len, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=g).to(dtype)
    return q, k, v


def per_document_truth(q, k, v, bounds):
    """Each segment through plain causal attention on its own, written as [B, L, H, D]."""
    b, h, n, d = q.shape
    out = torch.empty(b, n, h, d, dtype=torch.float64)
    rep = h // k.shape[1]
    for s, e in zip(bounds[:-1], bounds[1:]):
        row, lo = divmod(s, n)
        hi = lo + e - s
        qs = q[row, :, lo:hi].double()
        ks = k[row, :, lo:hi].double().repeat_interleave(rep, dim=0)
        vs = v[row, :, lo:hi].double().repeat_interleave(rep, dim=0)
        out[row, lo:hi] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


def test_reference_equals_documents_run_one_by_one():
    bounds = random_bounds(2, 40, 1, 15, seed=1)
    q, k, v = qkv(2, 4, 2, 40, 8, torch.float32)
    cu = torch.tensor(bounds, dtype=torch.int32)
    got = packed_attention_reference(q, k, v, cu)
    torch.testing.assert_close(got.double(), per_document_truth(q, k, v, bounds), atol=1e-5, rtol=1e-5)


def test_reference_sees_no_other_document():
    # Changing document 2's keys/values must not change document 1's output (and vice versa it does).
    bounds = [0, 10, 24]
    q, k, v = qkv(1, 2, 2, 24, 8, torch.float32)
    cu = torch.tensor(bounds, dtype=torch.int32)
    base = packed_attention_reference(q, k, v, cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:] += 5.0
    v2[:, :, 10:] -= 3.0
    moved = packed_attention_reference(q, k2, v2, cu)
    torch.testing.assert_close(moved[:, :10], base[:, :10])
    assert not torch.allclose(moved[:, 10:], base[:, 10:])


@pytest.mark.parametrize("backend", ["sdpa", "loop"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_backend_matches_reference_fp32_values_and_grads(backend, kv_heads):
    bounds = random_bounds(3, 48, 1, 20, seed=kv_heads)
    cu = torch.tensor(bounds, dtype=torch.int32)
    base = qkv(3, 4, kv_heads, 48, 16, torch.float32, seed=7)
    grad_out = torch.randn(3, 48, 4, 16, generator=torch.Generator().manual_seed(3))

    def run(name):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = packed_attention(q, k, v, cu, max_seqlen=20, backend=name)
        out.backward(grad_out)
        return out.detach(), q.grad, k.grad, v.grad

    for got, want in zip(run(backend), run("reference")):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_bf16_close_to_fp64_truth(backend):
    bounds = random_bounds(2, 64, 4, 30, seed=5)
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v = qkv(2, 4, 2, 64, 16, torch.bfloat16, seed=2)
    got = packed_attention(q, k, v, cu, max_seqlen=30, backend=backend)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 64, 4, 16)
    torch.testing.assert_close(got.double(), per_document_truth(q, k, v, bounds), atol=3e-2, rtol=3e-2)


def test_scale_and_single_token_segments():
    bounds = [0, 1, 2, 5, 6, 8]
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v = qkv(1, 2, 2, 8, 4, torch.float32)
    want = packed_attention_reference(q, k, v, cu, scale=0.3)
    for fn in (packed_attention_sdpa, packed_attention_loop):
        torch.testing.assert_close(fn(q, k, v, cu, 0.3), want, atol=1e-6, rtol=1e-5)
    # A one-token segment attends only to itself: its output is its own value.
    torch.testing.assert_close(want[0, 0], v[0, :, 0])


def test_block_diagonal_mask_layout():
    mask = block_diagonal_causal_mask(torch.tensor([0, 2, 4, 5, 8], dtype=torch.int32), 2, 4)
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    row0 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    row1 = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], row0) and torch.equal(mask[1, 0], row1)


def test_segment_ids():
    ids = segment_ids(torch.tensor([0, 3, 4, 7], dtype=torch.int32), 7)
    assert ids.tolist() == [0, 0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize(
    "bounds, match",
    [
        ([0, 5, 12], "end at B\\*L"),
        ([1, 8, 16], "start at 0"),
        ([0, 4, 4, 16], "strictly increasing"),
        ([0, 5, 10, 16], "crosses a row"),
    ],
)
def test_bad_bounds_are_rejected(bounds, match):
    with pytest.raises(ValueError, match=match):
        check_bounds(bounds, batch=2, seq_len=8)


def test_kv_heads_must_divide_query_heads():
    q, k, v = qkv(1, 4, 3, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        packed_attention(q, k, v, torch.tensor([0, 8], dtype=torch.int32), 8, backend="sdpa")


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_written_out_document_kernel_in_the_loop_matches_reference(kv_heads):
    # bf16 documents of 5-80 tokens: the loop writes out those of >= WRITTEN_OUT_MIN_TOKENS
    # (grouped-query matmuls) and hands the shorter ones to SDPA, in the same call.
    from cprec_kernels.loop import WRITTEN_OUT_MIN_TOKENS

    bounds = random_bounds(2, 160, 5, 80, seed=11)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    assert min(lengths) < WRITTEN_OUT_MIN_TOKENS <= max(lengths)
    cu = torch.tensor(bounds, dtype=torch.int32)
    base = qkv(2, 6, kv_heads, 160, 16, torch.bfloat16, seed=4)
    grad_out = torch.randn(2, 160, 6, 16, generator=torch.Generator().manual_seed(5)).bfloat16()

    def run(name, dtype):
        q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in base)
        out = packed_attention(q, k, v, cu, max_seqlen=max(lengths), backend=name, scale=0.2)
        out.backward(grad_out.to(dtype))
        return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]

    for got, want in zip(run("loop", torch.bfloat16), run("reference", torch.float32)):
        torch.testing.assert_close(got, want, atol=4e-2, rtol=4e-2)


def test_document_attention_groups_query_heads_like_repeat_kv():
    from cprec_kernels.loop import document_attention

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(h, 40, 8, generator=g) for h in (6, 2, 2)]
    upstream = torch.randn(6, 40, 8, generator=g)

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = fn(q, k, v)
        out.backward(upstream)
        return out.detach(), q.grad, k.grad, v.grad

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)  # noqa: E731
    for got, want in zip(run(lambda q, k, v: document_attention(q, k, v, 0.3)), run(sdpa)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    got = document_attention(*(t.bfloat16() for t in base), 0.3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), run(sdpa)[0], atol=3e-2, rtol=3e-2)
