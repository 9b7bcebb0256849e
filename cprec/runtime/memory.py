"""Will the model fit? Model-state memory per rank, estimated before anything is built.

The estimate is the ZeRO paper's arithmetic for AdamW (Rajbhandari et al., 2020), per parameter:
module weights ``P`` and gradients ``G`` (2 bytes each in bf16, 4 in fp32) and optimizer state
``O`` (bf16: fp32 master copy + two moments = 12 bytes; fp32: the two moments = 8 bytes), of which
ZeRO-1 shards ``O``, ZeRO-2 ``G + O`` and ZeRO-3 everything over the ranks; ZeRO-Offload moves the
optimizer state to host memory. A model built *unsharded* (ZeRO 0-2) also needs one full fp32
copy per rank on the host at start-up. Activations are not counted: the estimate is a floor, and a
run it refuses could not have started.

On a GPU the model states are compared with the device's memory; on a CPU run device and host are
the same memory, shared by the ranks of the node. ``train.memory_per_rank_gb`` overrides what a
rank may use (0 = what the machine has).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from cprec.runtime.engine import EngineSpec

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs for the model states, and the formula they come from."""

    n_params: int
    device_bytes: int
    """Weights, gradients and (unless offloaded) optimizer state on the rank's device."""
    host_bytes: int
    """Offloaded optimizer state plus, for an unsharded build, the full fp32 start-up copy."""
    formula: str
    """How ``device_bytes`` per parameter was computed, e.g. ``(2 + 2 + 12) / 8``."""


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / 1024**2:.0f} MiB"


def estimate(n_params: int, spec: EngineSpec, sharded_build: bool) -> MemoryEstimate:
    """Model-state bytes per rank for ``n_params`` parameters under ``spec`` (see module docstring)."""
    bf16 = spec.dtype == "bf16"
    p = g = 2 if bf16 else 4
    o = 12 if bf16 else 8
    n = spec.world_size
    stage = spec.zero_stage
    shard = {0: (1, 1, 1), 1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}[stage]
    parts = [p / shard[0], g / shard[1], o / shard[2]]
    names = [f"{p}" if shard[0] == 1 else f"{p}/{n}", f"{g}" if shard[1] == 1 else f"{g}/{n}"]
    names.append(f"{o}" if shard[2] == 1 else f"{o}/{n}")
    host = 0.0
    if spec.offload_optimizer:
        host += parts[2] * n_params
        parts[2], names[2] = 0.0, "0 (offloaded)"
    if not sharded_build:
        host += 4 * n_params  # the full fp32 model every rank builds before DeepSpeed partitions it
    return MemoryEstimate(
        n_params=n_params,
        device_bytes=int(sum(parts) * n_params),
        host_bytes=int(host),
        formula=" + ".join(names),
    )


def local_world_size() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node, else 1)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.split("(")[0].isdigit():
            return max(1, int(value.split("(")[0]))
    return 1


def available_bytes(gpu: bool, local_ranks: int, device_index: int = 0) -> tuple[int, str]:
    """(bytes one rank may use, where the number comes from) when no budget is configured."""
    if gpu:
        import torch

        total = torch.cuda.get_device_properties(device_index).total_memory
        return int(total), f"the memory of GPU {device_index}"
    import psutil

    total = psutil.virtual_memory().total
    return int(total / max(1, local_ranks)), f"the host's memory / {local_ranks} rank(s) on this node"


def check_fits(
    n_params: int,
    spec: EngineSpec,
    *,
    sharded_build: bool,
    budget_gb: float,
    gpu: bool,
    local_ranks: int,
    device_index: int = 0,
) -> MemoryEstimate:
    """Raise ValueError, with the estimate and the settings to change, when the model states of one
    rank exceed ``budget_gb`` (0 = `available_bytes`); return the estimate otherwise."""
    est = estimate(n_params, spec, sharded_build)
    if budget_gb > 0:
        budget, where = int(budget_gb * GIB), f"train.memory_per_rank_gb={budget_gb:g}"
    else:
        budget, where = available_bytes(gpu, local_ranks, device_index)
        where = f"train.memory_per_rank_gb=0 ({where})"
    # On a CPU run "device" and host are one memory; on a GPU the host copy has the host's memory.
    need = est.device_bytes if gpu else est.device_bytes + est.host_bytes
    what = (
        f"{n_params:,} parameters x ({est.formula}) bytes = {_size(est.device_bytes)} of weights, "
        f"gradients and optimizer state per rank (ZeRO-{spec.zero_stage}, {spec.dtype}, "
        f"{spec.world_size} rank(s))"
    )
    if not gpu and est.host_bytes:
        what += f" + {_size(est.host_bytes)} on the host"
        if not sharded_build:
            what += " (the full fp32 copy an unsharded build holds at start-up)"
    log.info("memory estimate: %s; budget %s (%s)", what, _size(budget), where)
    problems = []
    if need > budget:
        problems.append(f"{what} needs {_size(need)}, more than the {_size(budget)} of {where}")
    if gpu and est.host_bytes:
        host, host_where = available_bytes(False, local_ranks)
        if est.host_bytes > host:
            problems.append(
                f"{n_params:,} parameters need {_size(est.host_bytes)} of host memory per rank "
                f"(offloaded optimizer state and/or the full fp32 copy of an unsharded build), more than "
                f"the {_size(host)} of {host_where}"
            )
    if problems:
        fixes = []
        if spec.zero_stage < 3:
            fixes.append("train.zero_stage=3 (shards everything, and builds the model sharded)")
        fixes.append("more ranks")
        if not spec.offload_optimizer and spec.zero_stage >= 1:
            fixes.append("train.offload_optimizer=true")
        if spec.dtype == "fp32":
            fixes.append("model.dtype=bf16")
        fixes.append("train.memory_per_rank_gb=<GiB> if a rank really has more memory")
        raise ValueError(
            "model too large for the configured memory: "
            + "; ".join(problems)
            + "; change: "
            + ", or ".join(fixes)
        )
    return est
