"""The compiled RMSNorm against the eager reference, and the reference against transformers' norms."""

from __future__ import annotations

import pytest
import torch

from cprec.model.packed import RMS_NORM_CLASSES
from cprec_kernels import rms_norm, rms_norm_reference


def _norm_class(name):
    import importlib

    family = name.removesuffix("RMSNorm").lower()
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


@pytest.mark.parametrize("name", RMS_NORM_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_exactly_transformers_norm(name, dtype):
    norm = _norm_class(name)(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(rms_norm_reference(x, norm.weight, norm.variance_epsilon), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_equals_eager_values_and_gradients(dtype):
    g = torch.Generator().manual_seed(1)
    weight0 = (torch.rand(48, generator=g) + 0.5).to(dtype)
    x0 = torch.randn(2, 16, 48, generator=g).to(dtype)
    upstream = torch.randn(2, 16, 48, generator=g).to(dtype)

    def run(backend):
        x, w = x0.clone().requires_grad_(), weight0.clone().requires_grad_()
        out = rms_norm(x, w, 1e-6, backend=backend)
        out.backward(upstream)
        return out.detach(), x.grad, w.grad

    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    for got, want in zip(run("compiled"), run("eager")):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


def test_unknown_norm_backend_is_refused():
    with pytest.raises(ValueError, match="unknown norm backend 'fused'"):
        rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, backend="fused")
