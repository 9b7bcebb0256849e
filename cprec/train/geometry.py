"""Training's batch geometry (micro batch x accumulation x ranks) and the engine spec it implies."""

from __future__ import annotations

from dataclasses import dataclass

from cprec.config import Config, TrainConfig
from cprec.runtime.engine import EngineSpec


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


def engine_spec(cfg: Config, geo: BatchGeometry) -> EngineSpec:
    """The pre-training engine: train.* optimizer and ZeRO settings, model.dtype, this geometry."""
    t = cfg.train
    return EngineSpec(
        micro_batch_size=geo.micro_batch_size,
        grad_accum=geo.grad_accum,
        world_size=geo.world_size,
        zero_stage=t.zero_stage,
        offload_optimizer=t.offload_optimizer,
        dtype=cfg.model.dtype,
        lr=t.lr,
        betas=tuple(t.betas),
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        fused_adamw=t.fused_adamw,
        zero3_step=t.zero3_step,
        zero3_leaf=t.zero3_leaf,
    )
