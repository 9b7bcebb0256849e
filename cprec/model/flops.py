"""Parameter counts and training FLOPs per token, for the model-FLOPs-utilisation (MFU) estimate."""

from __future__ import annotations

from torch import nn


def _numel(p) -> int:
    # Under DeepSpeed ZeRO-3 a parameter's local tensor is an empty shard; ds_numel is the full size.
    return int(getattr(p, "ds_numel", p.numel()))


def count_params(
    model: nn.Module, *, exclude_input_embeddings: bool = False, trainable_only: bool = False
) -> int:
    """Number of parameters (full sizes, also when ZeRO-3 has partitioned them).

    Shared (tied) parameters count once. ``exclude_input_embeddings`` drops the token-embedding table
    (a lookup, no matmul) unless it is tied to the output head, which does a matmul with it.
    """
    skip: set[int] = set()
    if exclude_input_embeddings and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or head.weight is not emb:
            skip.add(id(emb))
    total = 0
    for p in model.parameters():  # parameters() already yields each shared tensor once
        if id(p) in skip or (trainable_only and not p.requires_grad):
            continue
        total += _numel(p)
    return total


def config_params(hf_config) -> int:
    """Parameters of the causal LM a transformers config describes, counted on the meta device
    (no memory, a fraction of a second): what the memory check needs before anything is built."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return count_params(model)


def flops_per_token(model_config, n_params: int, seq_len: float, *, causal: bool = False) -> float:
    """Training FLOPs (forward + backward) per token: ``6 N + 12 * layers * hidden * seq_len``.

    ``model_config`` is a :class:`cprec.config.ModelConfig` or a transformers config (needed for
    folder models, whose shape the ModelConfig fields do not describe). ``n_params`` should count the
    parameters that do matmuls: ``count_params(model, exclude_input_embeddings=True)``.

    The attention term follows the PaLM / Megatron convention (the full ``seq_len`` context, as
    published MFU numbers use); ``causal=True`` counts only the unmasked half. With packed rows
    attention never crosses a document, so pass the mean document length as ``seq_len`` for the
    work actually done, or the row length for numbers comparable with unpacked training.
    """
    layers = getattr(model_config, "num_layers", None) or model_config.num_hidden_layers
    hidden = model_config.hidden_size
    attn = 12.0 * layers * hidden * float(seq_len)
    if causal:
        attn /= 2.0
    return 6.0 * n_params + attn
