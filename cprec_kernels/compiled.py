"""The ``torch.compile``-d form of a kernel function, once per process, and the ``eager | compiled``
switch that RMSNorm and SwiGLU share.

Several kernels here are a written-out PyTorch function whose fast path is inductor fusing it
(`norm`, `swiglu`, the loss chunk in `cross_entropy`). They share one compile cache so that every
module of a model calls the same compiled function, and one switch so that an unknown backend is
refused the same way everywhere. ``dynamic=None``: the first shape is compiled static (training's
shapes are fixed); a second shape compiles one dynamic kernel instead of one per shape. (flex
attention compiles its own way, static shapes on CUDA: `flex`.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

COMPILE_BACKENDS = ("eager", "compiled")


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, made once per process per function."""
    return torch.compile(fn, dynamic=None)


def eager_or_compiled(fn: Callable, backend: str, what: str) -> Callable:
    """``fn`` itself for ``eager``, `compiled` ``fn`` for ``compiled``; any other ``backend`` is
    refused with an error naming ``what`` (e.g. ``norm``)."""
    if backend == "compiled":
        return compiled(fn)
    if backend != "eager":
        raise ValueError(f"unknown {what} backend {backend!r}; choose from {list(COMPILE_BACKENDS)}")
    return fn
