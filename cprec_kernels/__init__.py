"""CPRec kernels, imported as ``cprec_kernels`` (not ``kernels``: that name belongs to Hugging Face).

A small dispatcher picks, per call, between a pure-PyTorch reference and fast paths: packed
(varlen) causal attention, a language-model loss that need not materialise full logits, and
compiled RMSNorm and SwiGLU activations.
"""

from .cross_entropy import chunked_cross_entropy, cross_entropy_reference
from .dispatch import (
    ATTENTION_BACKENDS,
    CE_BACKENDS,
    choose_attention_backend,
    choose_ce_backend,
    lm_cross_entropy,
    packed_attention,
)
from .flash import flash_available
from .flex import flex_available
from .liger import liger_available
from .norm import NORM_BACKENDS, rms_norm, rms_norm_reference
from .swiglu import MLP_BACKENDS, swiglu, swiglu_reference

__all__ = [
    "ATTENTION_BACKENDS",
    "CE_BACKENDS",
    "MLP_BACKENDS",
    "NORM_BACKENDS",
    "choose_attention_backend",
    "choose_ce_backend",
    "chunked_cross_entropy",
    "cross_entropy_reference",
    "flash_available",
    "flex_available",
    "liger_available",
    "lm_cross_entropy",
    "packed_attention",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
