"""Packed attention on a CUDA GPU against the reference: flash (transformers' flash_attention_2
varlen path; skipped without flash-attn) and compiled flex_attention (skipped without it)."""

from __future__ import annotations

import pytest
import torch

from cprec_kernels import flash_available, flex_available, packed_attention

needs_flash = pytest.mark.skipif(not flash_available(), reason="needs flash-attn (pip install 'cprec[gpu]')")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _bounds(batch: int, seq_len: int, lengths: list[int]) -> list[int]:
    bounds, it = [0], iter(lengths * 1000)
    for r in range(batch):
        pos, end = r * seq_len, (r + 1) * seq_len
        while pos < end:
            pos = min(pos + next(it), end)
            bounds.append(pos)
    return bounds


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("flash", marks=needs_flash),
        pytest.param("flex", marks=pytest.mark.skipif(not flex_available(), reason="no flex_attention")),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_matches_reference_values_and_grads(backend, dtype, kv_heads):
    torch.manual_seed(0)
    b, h, n, d = 2, 8, 512, 64
    bounds = _bounds(b, n, [37, 120, 5, 200, 64, 1, 90])
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    max_seqlen = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    base = [
        torch.randn(b, h, n, d, device="cuda", dtype=dtype),
        torch.randn(b, kv_heads, n, d, device="cuda", dtype=dtype),
        torch.randn(b, kv_heads, n, d, device="cuda", dtype=dtype),
    ]
    grad_out = torch.randn(b, n, h, d, device="cuda", dtype=dtype)

    def run(backend):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = packed_attention(q, k, v, cu, max_seqlen, backend=backend)
        out.backward(grad_out)
        return [out.detach(), q.grad, k.grad, v.grad]

    fast, ref = run(backend), run("reference")
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@needs_flash
def test_auto_picks_flash_on_cuda():
    q = torch.randn(1, 4, 64, 32, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32, device="cuda")
    out = packed_attention(q, q, q, cu, 44, backend="auto")
    ref = packed_attention(q, q, q, cu, 44, backend="reference")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@needs_flash
def test_flash_rejects_fp32():
    q = torch.randn(1, 2, 16, 32, device="cuda")
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        packed_attention(
            q, q, q, torch.tensor([0, 16], dtype=torch.int32, device="cuda"), 16, backend="flash"
        )
