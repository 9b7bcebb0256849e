"""flex_attention with the document-causal block mask against the reference (eager forward on CPU;
forward and backward compiled on CUDA are in test_flash_gpu.py)."""

from __future__ import annotations

import pytest
import torch

import cprec_kernels.flex as flex
from cprec_kernels import flex_available, packed_attention

pytestmark = pytest.mark.skipif(not flex_available(), reason="this torch has no flex_attention")


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_matches_reference_and_never_crosses_documents(kv_heads):
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 64, 16
    cu = torch.tensor([0, 10, 30, 64, 69, 104, 128], dtype=torch.int32)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, kv_heads, n, d), torch.randn(b, kv_heads, n, d)
    with torch.no_grad():  # flex has no CPU backward
        got = packed_attention(q, k, v, cu, 35, backend="flex")
        want = packed_attention(q, k, v, cu, 35, backend="reference")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # Other boundaries: the cached block mask must not be reused, and the output changes.
        other = torch.tensor([0, 20, 64, 100, 128], dtype=torch.int32)
        got2 = packed_attention(q, k, v, other, 36, backend="flex")
        torch.testing.assert_close(got2, packed_attention(q, k, v, other, 36, backend="reference"))
        assert not torch.allclose(got, got2)


def test_flex_refuses_dropout():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(RuntimeError, match="dropout"):
        flex.packed_attention_flex(q, q, q, [0, 16], dropout=0.1)
