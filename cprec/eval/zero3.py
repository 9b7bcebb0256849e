"""ZeRO-3 partitioned inference for the evaluation job (``eval.zero3_inference``): the model's
weights are spread over the ranks while encoding and scoring, so no rank holds them whole (a 7B
model in bf16 over 8 ranks: 1.75 GB of weights per rank instead of 14).

Build: `cprec.model.sharded.load`, the training job's loader, under `inference_config` (ZeRO-3, in
``eval.dtype``): the model is constructed inside ``deepspeed.zero.Init`` and each rank reads only its
slices of the checkpoint's safetensors, so not even rank 0 ever holds the full weights.

Engine: ``deepspeed.initialize`` with that config and no optimizer, which is DeepSpeed's own
ZeRO-Inference: the engine then holds a ``DeepSpeedZeRoOffload`` (the parameter coordinator alone,
no optimizer state), whose hooks all-gather each submodule's parameters just before it runs and free
them after. ``deepspeed.init_inference`` is not used: it is tensor-parallel kernel injection (each
layer split over GPUs, the weights loaded whole first), with no ZeRO-3 partitioning and nothing to
run on CPU; the ZeRO-3 engine runs on CPU over gloo (``DS_ACCELERATOR=cpu``) and on GPUs over NCCL.

The engine wraps `InferenceModule`, whose one forward runs any of the three passes (decoder hidden
states for embeddings, logits for likelihoods, a whole ``generate`` call), because DeepSpeed starts
each pass's fetch trace in a hook on its root module: a pass that called a submodule directly (the
decoder alone, as the unsharded `cprec.eval.encode.embed` does) would never reset it.

Lockstep: every forward all-gathers parameters, a collective, so all ranks must run the same passes
in the same order, even a rank with less or no work. Where the number of passes is known up front
(encoding: batches), the ranks agree on the largest with one ``all_reduce`` MAX (`agree_max`) and a
rank with fewer runs 1-token padding passes (`PartitionedLM.pad_hidden`). Where it is not
(generative scoring: token-budget chunks, beam calls), `PartitionedLM.lockstep` opens a phase in
which every pass is preceded by a 1-element ``all_reduce`` MAX saying whether any rank still has
work, and a rank that is done runs the caller's padding pass until none has; ``generate`` itself runs
with ``synced_gpus`` (transformers keeps every rank stepping until all are done). One rank needs no
lockstep, and without ``eval.zero3_inference`` none of this runs (no extra collectives).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger(__name__)

TASKS = ("hidden", "logits", "generate")
DEFAULT_MAX_LIVE = 10**9
"""DeepSpeed's own ``stage3_max_live_parameters``: the cap never goes above it."""


def inference_config(dtype: torch.dtype, max_live: int = 0) -> dict:
    """The DeepSpeed config of the partitioned build and its engine (the same settings for both, so
    the partitions have the dtype the engine computes in): ZeRO-3, bf16 or fp32, no optimizer.

    ``max_live`` > 0 caps the parameters gathered at once (``stage3_max_live_parameters``, which
    bounds prefetching; one module's own are always gathered): `load` passes one rank's share of the
    model, so a rank holds gathered at most about that share plus the module running, whatever the
    model's size (DeepSpeed's default, 1e9 elements, lets a model smaller than that be prefetched
    whole on every rank).

    A parameter is freed right after its module's pass (``stage3_max_reuse_distance`` 0), even when
    the trace says it is needed again soon: with DeepSpeed's default (1e9 elements) a model under 1e9
    parameters stays gathered through a whole ``generate`` call, whole on every rank; a larger one is
    re-gathered every step either way. DeepSpeed's defaults stay for the rest: parameters of up to 1e5
    elements (norms, biases) are kept gathered after their first use
    (``stage3_param_persistence_threshold``, a few KB per layer), prefetching gathers the next
    modules' parameters during a pass (``stage3_prefetch_bucket_size``)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"config field 'eval.dtype': ZeRO-3 inference runs in bf16 or fp32, not {dtype}")
    zero: dict = {"stage": 3, "stage3_max_reuse_distance": 0}
    if max_live > 0:
        zero["stage3_max_live_parameters"] = int(max_live)
    return {
        "train_micro_batch_size_per_gpu": 1,  # DeepSpeed's config check wants a batch size; unused
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class InferenceModule(nn.Module):
    """The root module of the inference engine: one forward for every pass (see the module
    docstring for why), chosen by ``task``."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, task: str, **kwargs):
        if task == "hidden":  # the decoder alone: the vocabulary projection is neither run nor gathered
            base = getattr(self.hf_model, "base_model", self.hf_model)
            return base(**kwargs, use_cache=False).last_hidden_state
        if task == "logits":
            return self.hf_model(**kwargs)
        if task == "generate":
            return self.hf_model.generate(**kwargs)
        raise ValueError(f"unknown inference task {task!r} (one of {TASKS})")


def _all_reduce_max(value: int) -> int:
    """The largest ``value`` over the ranks (on the GPU under NCCL, which moves only GPU tensors)."""
    device = torch.device("cpu")
    if tdist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.long, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def agree_max(model, n: int) -> int:
    """The number of passes every rank runs when this rank has ``n``: the largest over the ranks
    for a model that needs lockstep, ``n`` itself (no collective) for any other."""
    return _all_reduce_max(n) if getattr(model, "needs_lockstep", False) else n


class PartitionedLM:
    """A ZeRO-3 partitioned causal LM in a DeepSpeed inference engine, with the surface the eval code
    uses of an HF model: ``config``, ``parameters()``, ``eval()``/``train()``, ``__call__`` (logits)
    and ``generate``, plus ``hidden`` for embeddings and the lockstep helpers. Always in eval mode."""

    training = False

    def __init__(self, engine, hf_model: nn.Module, world_size: int):
        self.engine = engine
        self.hf_model = hf_model
        self.config = hf_model.config
        self.generation_config = getattr(hf_model, "generation_config", None)
        self.needs_lockstep = world_size > 1
        self._phase_pad: Callable[[], object] | None = None
        self._padding = False

    # ------------------------------------------------------------------ the HF model's surface
    def parameters(self, recurse: bool = True):
        return self.hf_model.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.hf_model.named_parameters(*args, **kwargs)

    def eval(self) -> PartitionedLM:
        return self

    def train(self, mode: bool = True) -> PartitionedLM:
        if mode:
            raise ValueError("a ZeRO-3 inference model cannot be trained (eval.zero3_inference)")
        return self

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device  # a partitioned parameter's (empty) data

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, H] of the decoder (one pass; the caller keeps the lockstep)."""
        return self.engine(task="hidden", input_ids=input_ids, attention_mask=attention_mask)

    def pad_hidden(self) -> None:
        """A 1-token padding pass through the same modules as `hidden`, its result dropped."""
        one = torch.ones((1, 1), dtype=torch.long, device=self.device)
        self.hidden(one, one)

    @torch.no_grad()
    def __call__(self, **kwargs):
        """The HF model's forward (output with ``.logits``), inside a `lockstep` phase on N ranks."""
        self._turn()
        return self.engine(task="logits", **kwargs)

    @torch.no_grad()
    def generate(self, **kwargs):
        """``generate`` with ``synced_gpus`` on N ranks, inside a `lockstep` phase."""
        self._turn()
        return self.engine(task="generate", synced_gpus=self.needs_lockstep, **kwargs)

    # ------------------------------------------------------------------ lockstep of unknown length
    @contextlib.contextmanager
    def lockstep(self, pad: Callable[[], object]) -> Iterator[None]:
        """A phase of passes whose number differs between ranks: each pass (``__call__``,
        ``generate``) first asks every rank whether any still has work, and on leaving the phase a
        rank runs ``pad`` (a pass like the phase's own, result dropped) until no rank has. Every
        rank must open and leave the same phases in the same order. One rank: no collective.

        On leaving, every parameter still gathered is freed (``empty_partition_cache``): DeepSpeed
        prefetches along the trace of the previous pass, and after a ``generate`` call shorter than
        the one before, what it fetched for steps that never came would stay gathered."""
        if self._phase_pad is not None:
            raise RuntimeError("lockstep phases do not nest")
        self._phase_pad = pad
        try:
            yield
            self._padding = True
            while self.needs_lockstep and _all_reduce_max(0):  # another rank has a real pass: pad
                pad()
        finally:
            self._phase_pad, self._padding = None, False
            self.engine.empty_partition_cache()

    def _turn(self) -> None:
        if not self.needs_lockstep or self._padding:
            return
        if self._phase_pad is None:
            raise RuntimeError(
                "a ZeRO-3 inference pass (eval.zero3_inference) outside a lockstep phase: ranks would "
                "gather parameters out of step"
            )
        _all_reduce_max(1)  # this rank has work; the others pad alongside

    def close(self) -> None:
        """Remove the engine's hooks and let the partitions go."""
        if self.engine is not None:
            self.engine.destroy()
        self.engine = None


def load(folder: str | Path, dtype: torch.dtype) -> PartitionedLM:
    """The causal LM of local HF ``folder`` (safetensors), ZeRO-3 partitioned over the process group
    (started here when there is none, as the eval job's fine-tuning does), in an inference engine."""
    import deepspeed

    from cprec import quiet
    from cprec.model import sharded
    from cprec.runtime.engine import start_distributed

    info = start_distributed()
    try:
        hf_model = sharded.load(folder, inference_config(dtype), vocab_size=0)
    except ValueError as e:
        raise ValueError(f"eval.zero3_inference: cannot load {folder} partitioned: {e}") from e
    hf_model.eval().requires_grad_(False)
    held = sum(p.ds_tensor.numel() for p in hf_model.parameters())
    total = sum(p.ds_numel for p in hf_model.parameters())
    share = min(DEFAULT_MAX_LIVE, -(-total // info.world_size))
    with quiet.library_prints(log, "deepspeed"):
        engine, *_ = deepspeed.initialize(
            model=InferenceModule(hf_model), config=inference_config(dtype, max_live=share)
        )
    engine.eval()
    log.info(
        "%s: ZeRO-3 inference over %d rank(s) in %s, %.1f%% of %d weights on this rank",
        folder, info.world_size, str(dtype).replace("torch.", ""), 100 * held / max(total, 1), total,
    )  # fmt: skip
    return PartitionedLM(engine, hf_model, info.world_size)


def release(model) -> None:
    """Free a model the eval job is done with (a `PartitionedLM` removes its engine's hooks)."""
    close = getattr(model, "close", None)
    if callable(close):
        close()
