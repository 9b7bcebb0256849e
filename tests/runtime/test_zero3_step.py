"""train.zero3_step=lean: DeepSpeed's ZeRO-3 step without its gradient copies, checked against it.

Two engines on one tiny bf16 Llama, one with DeepSpeed's step as shipped and one with
`cprec.runtime.zero3_step`'s, take the same batches: every step's gradient norm (the clipping
input) and every weight afterwards must agree. The clip threshold is set low so that clipping acts.
"""

from __future__ import annotations

import deepspeed
import pytest
import torch

from cprec.config.sections import ModelConfig
from cprec.model.build import build_model
from cprec.runtime import engine as eng
from cprec.runtime import zero3_step

VOCAB = 96


def train_three_steps(
    step_kind: str, leaf: str = "layer"
) -> tuple[list[float], dict[str, torch.Tensor], object]:
    spec = eng.EngineSpec(
        micro_batch_size=2,
        zero_stage=3,
        dtype="bf16",
        lr=1e-2,
        grad_clip=0.05,
        zero3_step=step_kind,
        zero3_leaf=leaf,
    )
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
    model = build_model(cfg, VOCAB, seed=7, zero3=eng.zero3_build_config(spec))
    engine = eng.init_engine(model, spec)
    gen = torch.Generator().manual_seed(3)
    norms = []
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 24), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    weights = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            weights[name] = p.data.detach().clone()
    leaves = [type(m).__name__ for m in engine.module.modules() if getattr(m, "_z3_leaf", False)]
    assert leaves == (["LlamaDecoderLayer"] * cfg.num_layers if leaf == "layer" else [])
    return norms, weights, engine.optimizer


def test_lean_step_matches_deepspeeds_step(one_process_group):
    eng.start_distributed()
    ref_norms, ref_weights, ref_opt = train_three_steps("deepspeed")
    norms, weights, opt = train_three_steps("lean")
    assert not hasattr(ref_opt, "_cprec_fp32_grads")
    assert opt._cprec_fp32_grads  # the patched step ran: its fp32 buffers exist
    assert all(n > 0.05 for n in ref_norms)  # above the clip threshold: clipping acted every step
    assert norms == pytest.approx(ref_norms, rel=1e-12)
    assert weights.keys() == ref_weights.keys()
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=0, atol=0, msg=name)


def test_decoder_layers_as_zero3_leaves_train_the_same(one_process_group):
    # train.zero3_leaf=layer gathers each decoder layer whole (no hooks on its Linears, norms,
    # attention and MLP): the same norms and weights bit for bit as DeepSpeed's per-module hooks.
    eng.start_distributed()
    ref_norms, ref_weights, _ = train_three_steps("lean", leaf="module")
    norms, weights, _ = train_three_steps("lean", leaf="layer")
    assert norms == ref_norms
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=0, atol=0, msg=name)


def test_chunked_norm_equals_the_fp64_copy():
    # one gradient under a chunk, one over several chunks with a short last one
    grads = [torch.randn(96, 576).bfloat16(), torch.randn(5 * zero3_step.NORM_CHUNK + 77).bfloat16()]

    def original(gradients, params, norm_type=2):  # DeepSpeed's arithmetic, without the all-reduce
        return torch.stack([g.to(torch.float64).norm(norm_type) for g in gradients]).norm(norm_type)

    fast = zero3_step.norm_by_chunks(original)
    for p in (2, 1, float("inf")):
        assert float(fast(None, grads, None, p)) == pytest.approx(float(original(grads, None, p)), rel=1e-14)


def test_a_deepspeed_without_the_methods_keeps_its_step():
    class Other:
        pass

    assert zero3_step.install(Other()) is False
    with pytest.raises(ValueError, match="zero3_step"):
        eng.EngineSpec(micro_batch_size=1, zero3_step="fast")


def test_one_rank_reduces_in_place_and_several_scatter():
    from cprec.runtime.engine import EngineSpec, deepspeed_config

    one = deepspeed_config(EngineSpec(micro_batch_size=1, zero_stage=3), gpu=False)["zero_optimization"]
    two = deepspeed_config(EngineSpec(micro_batch_size=1, zero_stage=3, world_size=2), gpu=False)
    shipped_spec = EngineSpec(micro_batch_size=1, zero_stage=3, zero3_step="deepspeed")
    shipped = deepspeed_config(shipped_spec, gpu=False)
    assert one["reduce_scatter"] is False
    assert "reduce_scatter" not in two["zero_optimization"]  # DeepSpeed's default: scatter
    assert "reduce_scatter" not in shipped["zero_optimization"]
