"""Language-model loss from hidden states and the output-head weight, with or without full logits.

``cross_entropy_reference`` builds the ``[N, V]`` logits and calls ``F.cross_entropy``: simple,
and the ground truth, but a packed batch of 16k tokens with a 128k vocabulary needs 8 GiB of fp32
logits (plus as much again for their gradient).

``chunked_cross_entropy`` never holds more than ``[chunk, V]`` logits. When gradients are wanted
(training) the forward pass turns each chunk's logits straight into its share of the gradients of
the hidden states and the weight (softmax minus the one-hot target, in the buffer the log-sum-exp
was computed in), as Liger's fused linear cross-entropy does on CUDA, and the backward pass only
scales them by the incoming gradient: no logits are ever recomputed, at the price of holding the
fp32 weight gradient ``[V, H]`` from forward to backward (113 MB for a 49k x 576 head). Without
gradients (evaluation) it keeps only each token's log-sum-exp. The earlier form (log-sum-exp in
forward, logits recomputed in backward) cost one more ``N x H x V`` matmul per step, about 3% of a
SmolLM2-135M step (``benchmarks/results/train_ab.json``, ``ce``).

``compiled=True`` (``model.ce_backend=compiled``) runs each chunk's softmax, its loss and its
logits gradient as one ``torch.compile``-d function (`chunk_loss_and_grad`). Eager, the chunk takes
some nine passes over a ``[chunk, V]`` fp32 buffer (upcast, max, subtract, exp, sum, divide, the
one-hot, the row weights, the cast back for the matmuls); inductor fuses them into the two
reductions and one pass that writes the bf16 gradient, with no fp32 copy of the logits held.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .compiled import compiled as compiled_fn

IGNORE_INDEX = -100


def cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean token loss from full logits: ``hidden [N, H]``, ``weight [V, H]``, ``labels [N]`` -> fp32."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="mean")


def chunk_loss_and_grad(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss and the mean loss's gradient w.r.t. its logits, in the logits' dtype.

    ``logits [c, V]`` as the head's matmul made them; ``labels [c]`` valid ids (ignored rows carry
    any id and weight 0); ``weights [c]`` fp32, ``valid / n_valid``. The written-out softmax
    (max, exp, sum in fp32) so that ``torch.compile`` can fuse it (module docstring).
    """
    x = logits.float()
    top = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - top)
    sums = e.sum(dim=-1, keepdim=True)
    lse = (torch.log(sums) + top).squeeze(1)
    target = x.gather(1, labels[:, None]).squeeze(1)
    loss = torch.where(weights > 0, lse - target, 0.0).sum()
    hot = torch.arange(x.shape[1], device=x.device)[None, :] == labels[:, None]
    grad = (e / sums - hot.to(x.dtype)) * weights[:, None]
    return loss, grad.to(logits.dtype)


@functools.lru_cache(maxsize=4)
def _kept_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, role: str) -> torch.Tensor:
    """A ``[V, H]`` scratch tensor kept from one call to the next (CPU only, `_add_weight_grad`)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _add_weight_grad(total: torch.Tensor | None, g_low: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``total + g_low.T @ h`` in fp32 (the first chunk's product becomes the total).

    Why kept buffers on CPU: a ``[V, H]`` product (56 MB in bf16 at 49k x 576) and its fp32 sum
    (113 MB) are above glibc's mmap threshold, so fresh ones are new mappings that the kernel
    faults in page by page on every call: in a SmolLM2-135M step the two fp32 conversions took
    0.4 s where a copy into memory already mapped takes 30 ms (the step's profile). On CPU with a
    low-precision weight the product goes into one kept buffer and the sum into another, both
    reused from call to call; the caller gets ``total.to(weight.dtype)``, a fresh tensor, so
    nothing kept escapes. Same values bit for bit (``tests/kernels/test_cross_entropy.py``). An
    fp32 weight needs no conversion and CUDA's caching allocator reuses memory already: both
    keep the plain path."""
    kept = g_low.device.type == "cpu" and g_low.dtype != torch.float32
    if not kept:
        part = (g_low.t() @ h).float()
        return part if total is None else total.add_(part)
    shape = (g_low.shape[1], h.shape[1])
    part = torch.mm(g_low.t(), h, out=_kept_buffer(shape, g_low.dtype, g_low.device, "product"))
    if total is None:
        return _kept_buffer(shape, torch.float32, g_low.device, "sum").copy_(part)
    return total.add_(part)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, compiled=False):
        n = hidden.shape[0]
        valid = labels != ignore_index
        n_valid = int(valid.sum())
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        safe_labels = labels.masked_fill(~valid, 0)
        # Gradients of the mean loss, built chunk by chunk (see the module docstring); fp32 sums for
        # the weight and bias over chunks, cast once.
        grad_h = torch.zeros_like(hidden) if need_h else None
        # The fp32 weight gradient starts as the first chunk's product (no zero-filled [V, H] to add into).
        grad_w = None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grads = (need_h or need_w or need_b) and n_valid > 0
        fused = compiled and grads and not need_b
        row_weights = valid.float() / max(n_valid, 1) if fused else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e]
            if fused:
                loss, g_low = compiled_fn(chunk_loss_and_grad)(
                    F.linear(h, weight, bias), safe_labels[s:e], row_weights[s:e]
                )
                total += loss
                if need_h:
                    grad_h[s:e] = g_low @ weight
                if need_w:
                    grad_w = _add_weight_grad(grad_w, g_low, h)
                del g_low
                continue
            logits = F.linear(h, weight, bias).float()
            target = logits.gather(1, safe_labels[s:e, None]).squeeze(1)
            # In place: the one [chunk, V] buffer holds exp(logits - max), then the softmax.
            top = logits.amax(dim=-1, keepdim=True)
            sums = logits.sub_(top).exp_().sum(dim=-1)
            lse = sums.log() + top.squeeze(1)
            total += ((lse - target) * valid[s:e]).sum()
            if grads:
                g = logits.div_(sums[:, None])
                g.scatter_add_(1, safe_labels[s:e, None], torch.full_like(g[:, :1], -1.0))
                g.mul_((valid[s:e] / n_valid)[:, None])
                if need_b:
                    grad_b += g.sum(0)
                g_low = g.to(hidden.dtype)
                if need_h:
                    grad_h[s:e] = g_low @ weight
                if need_w:
                    grad_w = _add_weight_grad(grad_w, g_low, h)
                del g_low
            del logits  # free this chunk before the next one is allocated
        if need_w and grad_w is None:  # no chunk reached the weight (no valid label)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.grads = (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        if n_valid == 0:
            return total  # 0.0: no target tokens, nothing to learn from (every gradient is 0)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None  # computed in forward; a second backward has none
        if grads is None:
            raise RuntimeError("chunked_cross_entropy: backward through the same loss twice")
        scale = grad_out.float()
        out = [None if g is None else (g if bool(scale == 1) else g * scale.to(g.dtype)) for g in grads]
        return out[0], out[1], out[2], None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean token loss without materialising ``[N, V]`` logits (see module docstring).

    ``hidden [N, H]`` and ``weight [V, H]`` share a dtype (bf16 or fp32); log-sum-exp and the loss
    are accumulated in fp32. Labels equal to ``ignore_index`` contribute nothing; with no valid
    label at all the loss is 0 (not NaN as in ``F.cross_entropy``) and every gradient is 0.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"chunked_cross_entropy wants hidden [N, H], weight [V, H], labels [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    # Autocast would change the matmul dtype in forward but not in backward; dtypes are explicit here.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(
            hidden, weight, bias, labels, int(chunk_size), ignore_index, bool(compiled)
        )
