"""The compiled SwiGLU against the eager reference, and the reference against transformers' MLPs."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from cprec.model.packed import _PACKED_CALL, MLP_CLASSES, _packed_mlp_forward
from cprec_kernels import swiglu, swiglu_reference


def _mlp(name: str, dtype: torch.dtype) -> torch.nn.Module:
    family = name.removesuffix("MLP").lower()
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    config = getattr(module, f"{name.removesuffix('MLP')}Config")(
        hidden_size=24, intermediate_size=40, hidden_act="silu", num_attention_heads=4, num_key_value_heads=4
    )
    torch.manual_seed(0)
    return getattr(module, name)(config).to(dtype)


@pytest.mark.parametrize("name", MLP_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_exactly_transformers_mlp(name, dtype):
    mlp = _mlp(name, dtype)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    mlp.cprec_backend = "eager"
    token = _PACKED_CALL.set(True)
    try:
        routed = types.MethodType(_packed_mlp_forward, mlp)(x)
    finally:
        _PACKED_CALL.reset(token)
    assert torch.equal(routed, mlp(x))
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert torch.equal(swiglu_reference(gate, up), mlp.act_fn(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_equals_eager_values_and_gradients(dtype):
    g = torch.Generator().manual_seed(1)
    gate0 = torch.randn(2, 16, 40, generator=g).mul(3).to(dtype)
    up0 = torch.randn(2, 16, 40, generator=g).to(dtype)
    upstream = torch.randn(2, 16, 40, generator=g).to(dtype)

    def run(backend):
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        out = swiglu(gate, up, backend=backend)
        out.backward(upstream)
        return out.detach(), gate.grad, up.grad

    # bf16: inductor keeps silu(gate) in fp32 before the multiply where eager rounds it to bf16.
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    for got, want in zip(run("compiled"), run("eager")):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


def test_unknown_mlp_backend_is_refused():
    with pytest.raises(ValueError, match="unknown MLP backend 'fused'"):
        swiglu(torch.ones(2, 4), torch.ones(2, 4), backend="fused")
