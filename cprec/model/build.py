"""Build the causal LM: from scratch from a `ModelConfig`, or from a local HF model folder.

From scratch: a transformers config (``AutoConfig.for_model(cfg.arch, ...)``) sized by the config
fields and a vocabulary equal to the tokenizer's, then ``AutoModelForCausalLM.from_config``.
From a folder (continual pre-training of an existing Llama / Qwen2 / Mistral / OPT-style decoder):
``AutoModelForCausalLM.from_pretrained(folder)``; the embeddings grow when the tokenizer has more
ids than the model has rows. Nothing is downloaded: the folder must exist locally.

Sharded (``zero3=`` a ZeRO-3 DeepSpeed config, what training passes for ``train.zero_stage=3``):
the model is built inside ``deepspeed.zero.Init`` and a folder's weights are read slice by slice
into the partitions (:mod:`cprec.model.sharded`), so no rank holds the full model; the partitions
take the engine's dtype. Without it (ZeRO 0/1/2, single-process tools) every process builds the
whole model as described below.

Precision: weights are kept in fp32 whatever ``cfg.dtype`` says. Under DeepSpeed the engine's bf16
mode casts the module and keeps fp32 master weights in the optimizer; without DeepSpeed,
:class:`cprec.model.packed.PackedCausalLM` runs the decoder under ``torch.autocast(bfloat16)`` when
``cfg.dtype == "bf16"``. Loading a bf16 checkpoint therefore upcasts it (2x host memory while
loading; the sharded build avoids both copies).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from cprec.config import ModelConfig

from .flops import count_params

log = logging.getLogger(__name__)


def resolve_intermediate_size(cfg: ModelConfig) -> int:
    """MLP width: ``cfg.intermediate_size``, or round(8/3 * hidden) up to a multiple of 64 when 0."""
    if cfg.intermediate_size:
        return cfg.intermediate_size
    return int(math.ceil(round(8 * cfg.hidden_size / 3) / 64) * 64)


def hf_config(
    cfg: ModelConfig,
    vocab_size: int,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """The transformers config of a from-scratch model (``cfg.arch`` = llama | qwen2 | mistral)."""
    from transformers import AutoConfig

    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    extra = {}
    if cfg.arch == "mistral":
        # Packed attention does not implement sliding windows; documents are far shorter anyway.
        extra["sliding_window"] = None
    return AutoConfig.for_model(
        cfg.arch,
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=resolve_intermediate_size(cfg),
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=False,
        **extra,
    )


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers 4.x and 5.x names)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def folder_vocab_size(folder: str | Path) -> int:
    """Embedding rows of the model in a local HF folder, read from its config.json (no weights)."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"model.name_or_path: {path.parent} is not a local HF model folder (no config.json)"
        )
    conf = json.loads(path.read_text(encoding="utf-8"))
    conf = conf.get("text_config", conf)  # multimodal configs nest the decoder's
    if "vocab_size" not in conf:
        raise ValueError(f"{path}: no vocab_size")
    return int(conf["vocab_size"])


def fill_special_ids(config, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> None:
    """Special-token ids into a folder model's config, only where the folder left them unset."""
    for name, value in (
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if value is not None and getattr(config, name, None) is None:
            setattr(config, name, value)


def meta_model(
    cfg: ModelConfig,
    vocab_size: int,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """The model `build_model` would build, on the meta device: names, shapes, config and
    generation config, no weights (what an export needs to check and describe a checkpoint)."""
    from transformers import AutoModelForCausalLM

    if cfg.name_or_path:
        config = model_hf_config(cfg, vocab_size)
        fill_special_ids(config, bos_token_id, eos_token_id, pad_token_id)
    else:
        config = hf_config(
            cfg, vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    folder = Path(cfg.name_or_path).expanduser() if cfg.name_or_path else None
    if folder is not None and (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model


def model_hf_config(cfg: ModelConfig, vocab_size: int):
    """The transformers config of the model `build_model` would build (nothing is built): a folder's
    own config with the vocabulary grown to the tokenizer's, or `hf_config`."""
    if not cfg.name_or_path:
        return hf_config(cfg, vocab_size)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(cfg.name_or_path).expanduser(), local_files_only=True)
    text = getattr(config, "text_config", None) or config
    text.vocab_size = max(int(text.vocab_size), vocab_size)
    return config


def _from_folder(cfg: ModelConfig, vocab_size: int, zero3: dict | None = None, load_weights: bool = True):
    from transformers import AutoModelForCausalLM

    from . import sharded

    folder = Path(cfg.name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.name_or_path: {folder} is not a local HF model folder (no config.json); "
            "models are never downloaded, save one with save_pretrained() first"
        )
    if zero3 is not None:
        return sharded.load(folder, zero3, vocab_size, weights=load_weights)
    sharded.weight_files(folder)  # an incomplete shard index fails here, naming the missing file
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    sharded.fit_embeddings(model, vocab_size, rows=model.get_input_embeddings().weight.shape[0])
    return model


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    zero3: dict | None = None,
    load_weights: bool = True,
):
    """Return a ``transformers.PreTrainedModel`` (causal LM, fp32 weights, ``use_cache`` off).

    ``vocab_size`` is the tokenizer's; special-token ids, when given, go into the model config (for a
    folder model only where the folder left them unset). ``seed`` seeds the random initialisation of
    a from-scratch model. ``cfg.gradient_checkpointing`` turns on non-reentrant activation
    checkpointing of every decoder layer. ``zero3``: the engine's ZeRO-3 DeepSpeed config, to build
    the model partitioned (every rank of the process group must call this; see module docstring);
    with it, ``load_weights=False`` builds the architecture without reading a folder's weights or
    drawing random ones (a checkpoint replaces them). Without ``zero3`` weights are always there.
    """
    if cfg.name_or_path:
        model = _from_folder(cfg, vocab_size, zero3, load_weights)
        fill_special_ids(model.config, bos_token_id, eos_token_id, pad_token_id)
        source = str(cfg.name_or_path)
    else:
        from transformers import AutoModelForCausalLM

        config = hf_config(
            cfg, vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
        if seed is not None:
            torch.manual_seed(seed)
        if zero3 is not None:
            from . import sharded

            model = sharded.construct(config, zero3, random_init=load_weights)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        source = f"from scratch ({cfg.arch})"
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    emb = model.get_input_embeddings().weight
    log.info(
        "model %s: %s parameters (%s without input embeddings), vocab %d, gradient checkpointing %s%s",
        source,
        f"{count_params(model):,}",
        f"{count_params(model, exclude_input_embeddings=True):,}",
        getattr(emb, "ds_shape", emb.shape)[0],
        "on" if cfg.gradient_checkpointing else "off",
        ", ZeRO-3 partitioned at construction" if zero3 is not None else "",
    )
    return model
