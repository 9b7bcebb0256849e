"""Packed-sequence training wrapper around a transformers causal LM.

A packed row holds several documents back to back. Run as one ordinary sequence, each document
would attend to the ones before it and get positions that do not restart. Here:

- ``position_ids`` from the batch (restarting at each document) drive the rotary / learned
  positions, and ``use_cache=False`` is always passed (with a cache, transformers derives positions
  itself and the packed positions are silently wrong);
- attention goes through the ``cprec_packed`` implementation registered with transformers'
  ``AttentionInterface``: it reads the segment boundaries (``cu_seq_lens_q`` / ``max_length_q``,
  the names transformers' own flash varlen path uses) from the forward kwargs and calls the
  :mod:`cprec_kernels` dispatcher (reference | sdpa | loop | flex | flash, the last being
  transformers' own ``flash_attention_2`` varlen function fed with these boundaries);
- no ``[B, L, L]`` mask is built for a packed call (the mask function returns None), while plain
  calls without boundaries (padded evaluation batches, generation) keep transformers' SDPA
  semantics: the registered implementation then forwards to ``sdpa_attention_forward`` with the
  usual mask.

The loss is computed inside the output-head module itself (its class is switched to
:class:`PackedLMHead`, parameters untouched), because DeepSpeed ZeRO-3 only gathers a module's
partitioned parameters around that module's own forward and backward: reading
``hf_model.lm_head.weight`` from this wrapper would see an empty shard. Tied embeddings work the
same way (the shared parameter is a direct parameter of both modules, ZeRO-3 gathers it for each).

Getting an ordinary HF model back: ``wrapper.hf_model`` *is* the transformers model (same
parameters, same state-dict keys, ``save_pretrained`` works). Its output head still returns logits
when called without labels and its attention implementation still handles padded batches, so it
can be used as is for evaluation (``hf_model(input_ids, attention_mask=..., output_hidden_states=True)``
or ``hf_model.get_decoder()(...)`` for final hidden states). :func:`unwrap` also restores plain
``sdpa`` attention and the ``nn.Linear`` head class, e.g. before exporting.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import types

import torch
from torch import nn

from cprec.config import ModelConfig
from cprec_kernels import lm_cross_entropy, packed_attention, rms_norm, swiglu
from cprec_kernels.segments import bounds_list, check_bounds

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "cprec_packed"
MODEL_INPUT_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen")
"""Keys of a packed batch that :meth:`PackedCausalLM.forward` takes (the rest is bookkeeping)."""

# True while the decoder runs a packed call: the mask function then builds nothing.
_PACKED_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("cprec_packed_call", default=False)


def _packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: packed kernels when boundaries are given, else plain SDPA."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if sliding_window is not None:
            kwargs["sliding_window"] = sliding_window
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    max_seqlen = int(kwargs["max_length_q"])
    if sliding_window is not None and max_seqlen > sliding_window:
        raise NotImplementedError(
            f"packed attention has no sliding window: a document of {max_seqlen} tokens exceeds the "
            f"model's sliding_window={sliding_window}; use shorter documents (data.max_doc_tokens)"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("packed attention does not implement attention logit soft-capping")
    out = packed_attention(
        query,
        key,
        value,
        cu_seqlens,
        max_seqlen,
        scale=scaling,
        dropout=dropout,
        backend=kwargs.get("cprec_attn_backend", "auto"),
        bounds=kwargs.get("cprec_bounds"),
    )
    return out, None


def _packed_aware_mask(*args, **kwargs):
    """Mask function for ``cprec_packed``: nothing for packed calls, transformers' SDPA mask otherwise."""
    if _PACKED_CALL.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_packed_attention() -> None:
    """Register ``cprec_packed`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _packed_aware_mask)


def enable_packed_attention(hf_model: nn.Module) -> None:
    """Switch ``hf_model`` to the ``cprec_packed`` attention (padded calls keep SDPA semantics);
    refuses a model class that ignores custom attention implementations."""
    register_packed_attention()
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if getattr(hf_model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"{type(hf_model).__name__} does not accept a custom attention implementation "
            "(transformers AttentionInterface); packed training would silently attend across documents"
        )


def packed_hidden_states(
    hf_model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    attn_backend: str = "auto",
    check: bool = True,
) -> torch.Tensor:
    """Final hidden states ``[B, L, H]`` (after the last norm) of packed rows, through the decoder
    of ``hf_model`` (switched by `enable_packed_attention`): one home for the packed call that
    pre-training (`PackedCausalLM`) and the all-position fine-tuning share."""
    if input_ids.dim() != 2 or position_ids.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and position_ids must both be [B, L]; got {tuple(input_ids.shape)} and "
            f"{tuple(position_ids.shape)}"
        )
    bounds = bounds_list(cu_seqlens)
    if check:
        check_bounds(bounds, *input_ids.shape)
    max_seqlen = int(max_seqlen)
    cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
    kwargs = {
        "input_ids": input_ids,
        "position_ids": position_ids.to(input_ids.device),
        "attention_mask": None,
        "use_cache": False,  # with a cache transformers would recompute positions
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
        "cprec_bounds": bounds,
        "cprec_attn_backend": attn_backend,
    }
    token = _PACKED_CALL.set(True)
    try:
        return hf_model.get_decoder()(**kwargs).last_hidden_state
    finally:
        _PACKED_CALL.reset(token)


# transformers' RMSNorm classes whose forward is exactly `cprec_kernels.rms_norm_reference`
# (tests/kernels/test_norm.py compares each): only these are routed to another norm kernel.
RMS_NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
# transformers' gated MLPs, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: routed to
# `cprec_kernels.swiglu` when their act_fn is SiLU (tests/model/test_packed.py compares them).
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "MistralMLP")
SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch's, and transformers' own since 5.x


def _packed_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A norm's forward while `use_norm_backend` routes it: its kernel in packed calls, else its own."""
    if _PACKED_CALL.get():
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=self.cprec_backend)
    return type(self).forward(self, hidden_states)


def _packed_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP's forward while `use_mlp_backend` routes it: the projections are the module's own
    (their ZeRO-3 hooks run), the activation is the kernel's in packed calls."""
    if _PACKED_CALL.get():
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.cprec_backend))
    return type(self).forward(self, x)


def _route(
    hf_model: nn.Module, modules: list[nn.Module], backend: str, packed_forward, what: str, kinds: str
) -> int:
    """Give each of ``modules`` ``packed_forward`` with ``backend`` (``eager`` restores their own
    forward); returns how many are routed. Only the ``forward`` attribute changes, so the module's
    own hooks (ZeRO-3's gathers) still run; ``kinds`` names what was looked for, for the warning."""
    for module in modules:
        module.__dict__.pop("forward", None)
        module.__dict__.pop("cprec_backend", None)
        if backend != "eager":
            module.cprec_backend = backend
            module.forward = types.MethodType(packed_forward, module)
    if backend != "eager" and not modules:
        log.warning("%s=%s: %s has none of %s; they stay eager",
                    what, backend, type(hf_model).__name__, kinds)  # fmt: skip
    return len(modules) if backend != "eager" else 0


def use_norm_backend(hf_model: nn.Module, backend: str) -> int:
    """Run the RMSNorms of ``hf_model`` through `cprec_kernels.rms_norm` with ``backend`` in packed
    calls (``eager`` restores their own forward); returns how many norms are routed."""
    norms = [m for m in hf_model.modules() if type(m).__name__ in RMS_NORM_CLASSES]
    return _route(
        hf_model, norms, backend, _packed_norm_forward, "model.norm_backend", f"the norms {RMS_NORM_CLASSES}"
    )


def use_mlp_backend(hf_model: nn.Module, backend: str) -> int:
    """Run the SiLU-gated MLPs of ``hf_model`` through `cprec_kernels.swiglu` with ``backend`` in
    packed calls (``eager`` restores their own forward); returns how many MLPs are routed."""
    mlps = [
        m
        for m in hf_model.modules()
        if type(m).__name__ in MLP_CLASSES and type(getattr(m, "act_fn", None)).__name__ in SILU_CLASSES
    ]
    return _route(
        hf_model,
        mlps,
        backend,
        _packed_mlp_forward,
        "model.mlp_backend",
        f"the SiLU-gated MLPs {MLP_CLASSES}",
    )


class PackedLMHead(nn.Linear):
    """The model's ``nn.Linear`` output head, able to return the LM loss from its own forward.

    ``forward(hidden)`` returns logits as before; ``forward(hidden, labels)`` returns the mean loss
    over labels != -100 through :func:`cprec_kernels.lm_cross_entropy`, only for labelled tokens.
    Installed by switching the class of the existing head (no new parameters), see module docstring.
    """

    ce_backend: str = "auto"
    ce_chunk_size: int = 1024

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1)
        keep = flat_labels != -100
        # Ignored positions (document ends, padding) need no logits at all.
        flat, flat_labels = flat[keep], flat_labels[keep]
        with torch.autocast(device_type=flat.device.type, enabled=False):
            return lm_cross_entropy(
                flat.to(self.weight.dtype),
                self.weight,
                flat_labels,
                bias=self.bias,
                backend=self.ce_backend,
                chunk_size=self.ce_chunk_size,
            )


class PackedCausalLM(nn.Module):
    """Causal LM over packed rows; ``forward(input_ids, labels, position_ids, cu_seqlens, max_seqlen)``
    returns the loss.

    ``input_ids``, ``labels`` (already shifted, -100 = no target), ``position_ids``: int64 ``[B, L]``;
    ``cu_seqlens``: int32 boundaries over the flattened ``B * L`` tokens, no segment crossing a row;
    ``max_seqlen``: longest segment. Returns the fp32 mean loss over labelled tokens (0 if none).

    Precision: parameters stay as built (fp32 master weights). Under DeepSpeed bf16 the engine casts
    the module and this wrapper adds nothing; without DeepSpeed and ``cfg.dtype == "bf16"`` the
    decoder runs under ``torch.autocast(bfloat16)`` while the loss head stays in the weights' dtype.
    """

    def __init__(self, hf_model: nn.Module, cfg: ModelConfig):
        super().__init__()
        enable_packed_attention(hf_model)
        use_norm_backend(hf_model, cfg.norm_backend)
        use_mlp_backend(hf_model, cfg.mlp_backend)
        self.hf_model = hf_model
        self.attn_backend = cfg.attn_backend
        self.bf16_autocast = cfg.dtype == "bf16"
        self.check_inputs = True
        head = hf_model.get_output_embeddings()
        if type(head) is nn.Linear or isinstance(head, PackedLMHead):
            head.__class__ = PackedLMHead
            head.ce_backend = cfg.ce_backend
            head.ce_chunk_size = cfg.ce_chunk_size
            self._fused_head = True
        else:
            log.warning(
                "output head is %s, not nn.Linear: the loss uses full logits from its forward",
                type(head).__name__,
            )
            self._fused_head = False

    def _autocast(self, device_type: str):
        head = self.hf_model.get_output_embeddings()
        if self.bf16_autocast and head.weight.dtype == torch.float32:
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def hidden_states(self, input_ids, position_ids, cu_seqlens, max_seqlen) -> torch.Tensor:
        """Final hidden states ``[B, L, H]`` (after the last norm) of packed rows."""
        with self._autocast(input_ids.device.type):
            return packed_hidden_states(
                self.hf_model, input_ids, position_ids, cu_seqlens, max_seqlen,
                self.attn_backend, check=self.check_inputs,
            )  # fmt: skip

    def logits(self, input_ids, position_ids, cu_seqlens, max_seqlen) -> torch.Tensor:
        """Full logits ``[B, L, V]`` of packed rows (for tests and inspection; training uses the loss)."""
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        return self.hf_model.get_output_embeddings()(hidden)

    def forward(self, input_ids, labels, position_ids, cu_seqlens, max_seqlen) -> torch.Tensor:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        head = self.hf_model.get_output_embeddings()
        labels = labels.to(hidden.device)
        if self._fused_head:
            return head(hidden, labels)
        logits = head(hidden).float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def unwrap(model: PackedCausalLM | nn.Module) -> nn.Module:
    """The plain transformers model: ``sdpa`` attention, eager norms and MLPs and an ``nn.Linear``
    head again."""
    hf_model = model.hf_model if isinstance(model, PackedCausalLM) else model
    use_norm_backend(hf_model, "eager")
    use_mlp_backend(hf_model, "eager")
    head = hf_model.get_output_embeddings()
    if isinstance(head, PackedLMHead):
        head.__class__ = nn.Linear
        for name in ("ce_backend", "ce_chunk_size"):
            head.__dict__.pop(name, None)
    if getattr(hf_model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        hf_model.set_attn_implementation("sdpa")
    return hf_model
