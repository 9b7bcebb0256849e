"""DeepSpeed engine from our typed config: batch geometry, the DeepSpeed JSON, initialisation.

The DeepSpeed config is built here from `TrainConfig`/`ModelConfig` (nothing hand-written), with
no DeepSpeed LR scheduler: the trainer sets the LR from the pure WSA function every step. On a
CPU-only machine (``DS_ACCELERATOR=cpu``) the engine uses gloo and torch's AdamW, which avoids
building DeepSpeed's C++ Adam.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
from torch import nn

from cprec.config import Config, ModelConfig, TrainConfig
from cprec.dist import DistInfo, dist_info, init_distributed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchGeometry:
    """How many rows one rank and one optimizer step hold."""

    world_size: int
    micro_batch_size: int
    grad_accum: int
    seq_len: int

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        """Token capacity (padding included) of one optimizer step over all ranks."""
        return self.global_batch_size * self.seq_len


def batch_geometry(train: TrainConfig, world_size: int) -> BatchGeometry:
    """Resolve micro batch x accumulation x ranks, raising a clear error when they do not divide."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    accum = train.grad_accum
    if train.global_batch_size:
        per_micro = train.micro_batch_size * world_size
        if train.global_batch_size % per_micro:
            raise ValueError(
                f"config field 'train.global_batch_size': {train.global_batch_size} rows is not divisible "
                f"by train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) = "
                f"{per_micro}; change the batch size or the number of ranks"
            )
        accum = train.global_batch_size // per_micro
    return BatchGeometry(world_size, train.micro_batch_size, accum, train.seq_len)


def on_gpu() -> bool:
    """True when DeepSpeed will run on CUDA (not forced to CPU and a GPU is visible)."""
    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, none on norms, biases and other 1-D params."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def deepspeed_config(train: TrainConfig, model: ModelConfig, geo: BatchGeometry, gpu: bool) -> dict:
    """The DeepSpeed JSON for one run (ZeRO stage, bf16, accumulation, clipping, AdamW, offload)."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # Lets save_16bit_model / exports gather full weights; small params stay unpartitioned.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.offload_optimizer:
        if train.zero_stage == 0:
            raise ValueError("config field 'train.offload_optimizer': needs train.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    cfg = {
        "train_batch_size": geo.global_batch_size,
        "train_micro_batch_size_per_gpu": geo.micro_batch_size,
        "gradient_accumulation_steps": geo.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": model.dtype == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # torch's AdamW on CPU (no 50 s C++ op build); DeepSpeed's fused Adam on GPU.
                "torch_adam": not gpu,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.offload_optimizer and not gpu:
        # ZeRO-Offload insists on DeepSpeedCPUAdam unless told otherwise; torch's AdamW is fine on CPU.
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_distributed() -> DistInfo:
    """Bring up the process group for torchrun, the deepspeed launcher, srun, or a plain process.

    torchrun and the deepspeed launcher export RANK/WORLD_SIZE/MASTER_*; `cprec.dist` maps SLURM's
    variables onto those; a plain single process gets a local rendezvous on a free port.
    """
    import deepspeed

    info = dist_info()
    if info.world_size == 1:
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    init_distributed()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", verbose=False)
    if on_gpu():
        torch.cuda.set_device(dist_info().local_rank)
    return dist_info()


def init_engine(model: nn.Module, cfg: Config, geo: BatchGeometry, universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine (call `start_distributed` first).

    ``universal`` sets DeepSpeed's ``checkpoint.load_universal`` so the next ``load_checkpoint``
    reads a universal checkpoint (resume on a different world size).
    """
    import deepspeed

    ds_cfg = deepspeed_config(cfg.train, cfg.model, geo, on_gpu())
    if universal:
        ds_cfg["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds_cfg
    )
    log.info(
        "DeepSpeed engine: ZeRO-%d, %s, %d rank(s) x %d rows x %d accum = %d rows/step",
        cfg.train.zero_stage,
        cfg.model.dtype,
        geo.world_size,
        geo.micro_batch_size,
        geo.grad_accum,
        geo.global_batch_size,
    )
    return engine


def set_lr(engine, lr: float) -> None:
    """Write the scheduled LR into every optimizer param group (DeepSpeed has no scheduler here)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def num_params(engine) -> int:
    """Total parameter count, correct under ZeRO-3 (partitioned params report their full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
