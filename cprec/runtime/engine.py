"""DeepSpeed engine from an explicit optimizer/precision spec: the DeepSpeed JSON, initialisation.

Both jobs build their engine here: training from `cprec.train.geometry.engine_spec` (train.* and
model.dtype), contrastive fine-tuning from its own settings (`cprec.eval.finetune`). The spec says
everything the engine needs, so no job fakes another job's config to get one. There is no
DeepSpeed LR scheduler: the caller sets the LR (`set_lr`) when it has a schedule. On a CPU-only
machine (``DS_ACCELERATOR=cpu``) the engine uses gloo and torch's AdamW, which avoids building
DeepSpeed's C++ Adam. ZeRO stage 0 on one process is the plain single-device path.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from cprec import quiet
from cprec.runtime.dist import DistInfo, dist_info, init_distributed

log = logging.getLogger(__name__)

DTYPES = ("bf16", "fp32")


@dataclass(frozen=True)
class EngineSpec:
    """What a DeepSpeed engine is built from: batch, optimizer, precision, ZeRO stage."""

    micro_batch_size: int
    """Rows per rank per forward."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    world_size: int = 1
    """Ranks the batch is spread over."""
    zero_stage: int = 0
    """ZeRO stage 0-3 (0 = every rank holds everything; gradients are averaged over the ranks)."""
    offload_optimizer: bool = False
    """Optimizer state in CPU memory (ZeRO-Offload; needs zero_stage >= 1)."""
    dtype: str = "fp32"
    """Parameter/compute precision: bf16 | fp32."""
    lr: float = 1e-3
    """Initial AdamW learning rate (the caller may set another every step)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (never on norms, biases and other 1-D parameters)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 = off)."""
    fused_adamw: bool = True
    """On CPU: torch's fused AdamW kernel (one pass over each tensor; about 10x faster than the
    per-op update on one core, measured in benchmarks/results/train_ab.json). False = torch's per-op
    AdamW. On GPU DeepSpeed's FusedAdam is used either way."""
    zero3_step: str = "lean"
    """CPU, ZeRO-3 without offload: ``lean`` = DeepSpeed's step without its per-step fp64 and fp32
    gradient copies (`cprec.runtime.zero3_step`); ``deepspeed`` = DeepSpeed's step as shipped."""
    zero3_leaf: str = "layer"
    """ZeRO-3 hook granularity: ``layer`` = decoder layers are ZeRO-3 leaves (`mark_zero3_leaves`);
    ``module`` = DeepSpeed's hooks on every submodule."""

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine spec field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine spec field 'zero_stage' must be 0-3, got {self.zero_stage}")
        if self.dtype not in DTYPES:
            raise ValueError(f"engine spec field 'dtype' must be one of {DTYPES}, got {self.dtype!r}")
        if self.zero3_step not in ("lean", "deepspeed"):
            raise ValueError(
                f"engine spec field 'zero3_step' must be lean or deepspeed, got {self.zero3_step!r}"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("config field 'train.offload_optimizer': needs train.zero_stage >= 1")

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum


def on_gpu() -> bool:
    """True when DeepSpeed will run on CUDA (not forced to CPU and a GPU is visible)."""
    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, none on norms, biases and other 1-D params."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # A ZeRO-3 partition (built under zero.Init) is an empty 1-D tensor: its shape is ds_shape.
            dims = len(getattr(p, "ds_shape", p.shape))
            (decay if dims >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def deepspeed_config(spec: EngineSpec, gpu: bool) -> dict:
    """The DeepSpeed JSON for one engine (ZeRO stage, bf16, accumulation, clipping, AdamW, offload)."""
    zero: dict = {"stage": spec.zero_stage}
    if spec.zero_stage == 3:
        # Lets save_16bit_model / exports gather full weights; small params stay unpartitioned.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if spec.world_size == 1 and spec.zero3_step == "lean":
            # One rank has nothing to scatter: DeepSpeed's reduce-scatter path still concatenates
            # each gradient bucket into a new buffer, divides it by 1 and has gloo clone it. Its
            # all-reduce path divides and reduces the bucket in place (same values).
            zero["reduce_scatter"] = False
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    cfg = {
        "train_batch_size": spec.global_batch_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.dtype == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": spec.lr,
                "betas": list(spec.betas),
                "eps": 1e-8,
                "weight_decay": spec.weight_decay,
                # torch's AdamW on CPU (no 50 s C++ op build); DeepSpeed's fused Adam on GPU.
                "torch_adam": not gpu,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not gpu and spec.fused_adamw:
        cfg["optimizer"]["params"]["fused"] = True  # passed through to torch.optim.AdamW
    if spec.offload_optimizer and not gpu:
        # ZeRO-Offload insists on DeepSpeedCPUAdam unless told otherwise; torch's AdamW is fine on CPU.
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


_local_rendezvous = False
"""True once `start_distributed` chose MASTER_PORT itself (a plain process, no launcher)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_distributed() -> DistInfo:
    """Bring up the process group for torchrun, the deepspeed launcher, srun, or a plain process.

    torchrun and the deepspeed launcher export RANK/WORLD_SIZE/MASTER_*; `cprec.runtime.dist` maps
    SLURM's variables onto those; a plain single process gets a local rendezvous on a free port.
    """
    import deepspeed

    global _local_rendezvous
    info = dist_info()
    if info.world_size == 1 and not tdist.is_initialized():
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        if _local_rendezvous or "MASTER_PORT" not in os.environ:
            # Our own rendezvous (not a launcher's): a fresh port each time, since a job run earlier
            # in this process may have left its port in TIME_WAIT.
            os.environ["MASTER_PORT"] = str(_free_port())
            _local_rendezvous = True
    init_distributed()
    if not on_gpu():
        clear_stale_build_lock("deepspeed_shm_comm")
    with quiet.library_prints(log, "deepspeed"):  # "DeepSpeed ... shm_comm_op built successfully"
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", verbose=False)
    if on_gpu():
        torch.cuda.set_device(dist_info().local_rank)
    return dist_info()


STALE_LOCK_S = 300.0
"""A JIT-build lock older than this, beside an op already built, belongs to a killed process."""


def clear_stale_build_lock(name: str) -> bool:
    """Remove the torch extension build lock of op ``name`` when it is stale.

    DeepSpeed loads its CPU shared-memory op through torch's JIT loader on every
    ``init_distributed``, which holds a lock file (``FileBaton``: no owner recorded) for the
    fraction of a second a built op takes to load. A process killed in that moment (Ctrl-C, a
    scheduler's preemption) leaves the file behind and every later job waits on it forever. A lock
    older than ``STALE_LOCK_S`` beside the built library cannot be a live build: it is removed with
    a warning. Returns whether one was removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = Path(_get_build_directory(name, verbose=False))
    except Exception:  # a private torch helper: without it, leave the lock alone
        return False
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S or not any(folder.glob("*.so")):
        return False
    log.warning(
        "removing a stale build lock %s (%.0f s old, the op is built; its holder was killed)", lock, age
    )
    lock.unlink(missing_ok=True)
    return True


def zero3_build_config(spec: EngineSpec) -> dict | None:
    """The DeepSpeed config to build the model under ``zero.Init`` with (`cprec.model.sharded`): the
    very one `init_engine` will use, so partitioning and dtype match; None below ZeRO-3."""
    return deepspeed_config(spec, on_gpu()) if spec.zero_stage == 3 else None


def mark_zero3_leaves(model: nn.Module) -> int:
    """Flag each decoder layer of ``model`` as a ZeRO-3 leaf module; returns how many were flagged.

    Why: DeepSpeed's ZeRO-3 hooks every submodule (forward pre/post, backward pre/post), and each
    hook is Python work (trace bookkeeping, fetch and release of that module's parameters). A
    SmolLM2-135M layer has 12 hooked submodules, so a step runs about 1,500 hooks whatever the
    world size. A leaf (``deepspeed.utils.set_z3_leaf_modules``, the mechanism DeepSpeed offers for
    MoE blocks) is gathered and released as a whole and its submodules get no hooks; a decoder
    layer is what FSDP wraps as its unit too. The layers are the classes the transformers model
    names in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``); a model naming none keeps the
    default hooks. Call before ``deepspeed.initialize`` (which registers the hooks)."""
    from deepspeed.utils import set_z3_leaf_modules

    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = list({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        log.info("ZeRO-3 leaves: %s names no decoder layer class; every submodule keeps its hooks",
                 type(model).__name__)  # fmt: skip
        return 0
    return len(set_z3_leaf_modules(model, classes))


def init_engine(model: nn.Module, spec: EngineSpec, universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine (call `start_distributed` first).

    ``model`` may already be ZeRO-3 partitioned (built with `zero3_build_config`). ``universal``
    sets DeepSpeed's ``checkpoint.load_universal`` so the next ``load_checkpoint`` reads a universal
    checkpoint (resume on a different world size).
    """
    import deepspeed

    ds_cfg = deepspeed_config(spec, on_gpu())
    if spec.zero_stage == 3 and spec.zero3_leaf == "layer":
        mark_zero3_leaves(model)
    if universal:
        ds_cfg["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, spec.weight_decay), config=ds_cfg
    )
    if spec.zero3_step == "lean" and spec.zero_stage == 3 and not spec.offload_optimizer and not on_gpu():
        from cprec.runtime import zero3_step

        zero3_step.install(engine.optimizer)
    log.info(
        "DeepSpeed engine: ZeRO-%d, %s, %d rank(s) x %d rows x %d accum = %d rows/step",
        spec.zero_stage,
        spec.dtype,
        spec.world_size,
        spec.micro_batch_size,
        spec.grad_accum,
        spec.global_batch_size,
    )
    return engine


def set_lr(engine, lr: float) -> None:
    """Write the scheduled LR into every optimizer param group (DeepSpeed has no scheduler here)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def num_params(engine) -> int:
    """Total parameter count, correct under ZeRO-3 (partitioned params report their full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
