"""Chunked cross-entropy against F.cross_entropy on full logits: loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cprec_kernels import chunked_cross_entropy, cross_entropy_reference, lm_cross_entropy


def make(n=37, h=16, v=50, dtype=torch.float32, ignore_every=5, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def loss_and_grads(fn, hidden, weight, bias, labels):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    b = bias.clone().requires_grad_() if bias is not None else None
    loss = fn(leaves[0], leaves[1], labels, b)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves] + ([b.grad] if b is not None else [])


def full_logits(h, w, labels, b):
    return F.cross_entropy(F.linear(h, w, b).float(), labels, ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_full_logits_fp32(chunk, bias):
    hidden, weight, b, labels = make(bias=bias)
    got = loss_and_grads(
        lambda h, w, y, bb: chunked_cross_entropy(h, w, y, chunk, bias=bb), hidden, weight, b, labels
    )
    want = loss_and_grads(full_logits, hidden, weight, b, labels)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_chunked_bf16_close_to_full_logits():
    hidden, weight, _, labels = make(n=64, h=32, v=300, dtype=torch.bfloat16)
    got = loss_and_grads(lambda h, w, y, b: chunked_cross_entropy(h, w, y, 16), hidden, weight, None, labels)
    want = loss_and_grads(full_logits, hidden, weight, None, labels)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunks_equal_the_eager_chunks(dtype):
    """model.ce_backend=compiled: the fused chunk kernel against the eager chunked path (and, through
    the tests above, full logits): loss and both gradients; the 80 tokens leave a short last chunk."""
    hidden, weight, _, labels = make(n=80, h=32, v=300, dtype=dtype)
    eager = loss_and_grads(
        lambda h, w, y, b: chunked_cross_entropy(h, w, y, 32), hidden, weight, None, labels
    )
    fused = loss_and_grads(
        lambda h, w, y, b: chunked_cross_entropy(h, w, y, 32, compiled=True), hidden, weight, None, labels
    )
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 1e-2}
    assert fused[1].dtype == dtype and fused[2].dtype == dtype
    for g, w in zip(fused, eager):
        torch.testing.assert_close(g.float(), w.float(), **tol)
    with torch.no_grad():  # evaluation keeps the log-sum-exp path
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 32, compiled=True), eager[0])


def test_scaled_upstream_gradient():
    hidden, weight, _, labels = make()
    h1 = hidden.clone().requires_grad_()
    (3.0 * chunked_cross_entropy(h1, weight, labels, 7)).backward()
    h2 = hidden.clone().requires_grad_()
    (3.0 * full_logits(h2, weight, labels, None)).backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)


def test_without_gradients_the_loss_is_the_same_and_a_second_backward_is_refused():
    """Evaluation (no_grad, or nothing requiring grad) takes the log-sum-exp-only path; training's
    gradients are built in forward, so they can be taken once."""
    hidden, weight, _, labels = make()
    want = full_logits(hidden, weight, labels, None)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 7), want)
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 7), want)
    h = hidden.clone().requires_grad_()
    loss = chunked_cross_entropy(h, weight, labels, 7)  # a frozen head: only the hidden states learn
    loss.backward(retain_graph=True)
    assert weight.grad is None and h.grad is not None
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_all_labels_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, _, labels = make()
    labels[:] = -100
    for backend in ("chunked", "reference"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss = lm_cross_entropy(h, w, labels, backend=backend)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_dispatcher_backends_agree():
    hidden, weight, _, labels = make(n=80, v=200)
    ref = cross_entropy_reference(hidden, weight, labels)
    for backend in ("auto", "reference", "chunked", "compiled"):
        torch.testing.assert_close(
            lm_cross_entropy(hidden, weight, labels, backend=backend, chunk_size=9), ref
        )


def test_shape_and_dtype_errors():
    hidden, weight, _, labels = make()
    with pytest.raises(ValueError, match="shape mismatch"):
        chunked_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="share a dtype"):
        chunked_cross_entropy(hidden.bfloat16(), weight, labels)
    with pytest.raises(ValueError, match="hidden \\[N, H\\]"):
        chunked_cross_entropy(hidden[None], weight, labels)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_weight_gradient_through_kept_buffers_is_exact_and_never_shared(compiled):
    """On CPU a bf16 head's weight gradient is summed over chunks in buffers kept from call to call
    (`_add_weight_grad`): the same bits as summing fresh fp32 copies of each chunk's product, and a
    later call does not change a gradient an earlier call returned."""
    hidden, weight, _, labels = make(n=53, h=16, v=50, dtype=torch.bfloat16, seed=3)
    chunk = 10

    def expected_weight_grad(hidden, weight, labels):
        # The plain sum: each chunk's bf16 product copied afresh to fp32 and added.
        valid = labels != -100
        safe = labels.masked_fill(~valid, 0)
        total = None
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s : s + chunk], weight).float()
            g = logits.softmax(-1) - F.one_hot(safe[s : s + chunk], weight.shape[0]).float()
            g = (g * (valid[s : s + chunk].float() / int(valid.sum()))[:, None]).to(torch.bfloat16)
            part = (g.t() @ hidden[s : s + chunk]).float()
            total = part if total is None else total + part
        return total.to(torch.bfloat16)

    def weight_grad(hidden, weight, labels):
        w = weight.clone().requires_grad_()
        chunked_cross_entropy(hidden, w, labels, chunk, compiled=compiled).backward()
        return w.grad

    first = weight_grad(hidden, weight, labels)
    kept = first.clone()
    hidden2, weight2, _, labels2 = make(n=53, h=16, v=50, dtype=torch.bfloat16, seed=4)
    second = weight_grad(hidden2, weight2, labels2)
    assert torch.equal(first, kept)  # the second call wrote into its buffers, not into `first`
    assert first.data_ptr() != second.data_ptr()
    if not compiled:  # the compiled chunk's softmax may round differently from .softmax()
        assert torch.equal(first, expected_weight_grad(hidden, weight, labels))
        assert torch.equal(second, expected_weight_grad(hidden2, weight2, labels2))  # buffers start afresh
    torch.testing.assert_close(first.float(), expected_weight_grad(hidden, weight, labels).float(),
                               atol=2e-3, rtol=2e-2)  # fmt: skip
