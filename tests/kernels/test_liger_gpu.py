"""Liger Kernel's fused linear cross-entropy behind the dispatcher, against the full-logits
reference on a CUDA GPU: loss and gradients, ignored labels, bias (skipped without CUDA or liger)."""

from __future__ import annotations

import pytest
import torch

from cprec_kernels import cross_entropy_reference, liger_available, lm_cross_entropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not liger_available(), reason="needs liger-kernel (pip install 'cprec[gpu]')"),
]


def _case(n, h, v, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.05).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::7] = -100
    return hidden, weight, labels


def _loss_and_grads(backend, hidden, weight, labels):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = lm_cross_entropy(h, w, labels, backend=backend)
    loss.backward()
    return loss.detach().float(), h.grad.float(), w.grad.float()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("n,v", [(333, 1000), (4096, 151936)])  # small, and Qwen2's vocabulary
def test_liger_equals_reference(dtype, tol, n, v):
    hidden, weight, labels = _case(n, 256, v, dtype)
    got = _loss_and_grads("liger", hidden, weight, labels)
    want = _loss_and_grads("reference", hidden, weight, labels)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_liger_is_auto_on_cuda_and_handles_no_targets():
    hidden, weight, labels = _case(64, 128, 500, torch.bfloat16)
    auto = lm_cross_entropy(hidden, weight, labels, backend="auto")
    ref = cross_entropy_reference(hidden, weight, labels)
    torch.testing.assert_close(auto.float(), ref.float(), atol=2e-2, rtol=2e-2)
    none = torch.full_like(labels, -100)
    assert float(lm_cross_entropy(hidden, weight, none, backend="liger")) == 0.0
