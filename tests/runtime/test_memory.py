"""The start-up memory check: ZeRO arithmetic per rank, and the error that names what to change."""

from __future__ import annotations

import pytest

from cprec.config import load_config
from cprec.runtime.engine import EngineSpec
from cprec.runtime.memory import GIB, check_fits, estimate
from cprec.train.geometry import batch_geometry, engine_spec
from cprec.train.trainer import check_memory

N = 1_000_000_000


def spec(stage: int, dtype: str = "bf16", world: int = 8, offload: bool = False) -> EngineSpec:
    return EngineSpec(
        micro_batch_size=1, world_size=world, zero_stage=stage, dtype=dtype, offload_optimizer=offload
    )


def test_zero_arithmetic_per_rank():
    # The ZeRO paper's 2 + 2 + 12 bytes per parameter for bf16 AdamW, sharded stage by stage.
    assert estimate(N, spec(0), sharded_build=False).device_bytes == 16 * N
    assert estimate(N, spec(1), sharded_build=False).device_bytes == (4 + 12 / 8) * N
    assert estimate(N, spec(2), sharded_build=False).device_bytes == (2 + 14 / 8) * N
    assert estimate(N, spec(3), sharded_build=True).device_bytes == 16 * N / 8
    assert estimate(N, spec(3, "fp32"), sharded_build=True).device_bytes == 16 * N / 8  # 4 + 4 + 8
    assert estimate(N, spec(1, "fp32"), sharded_build=False).device_bytes == (8 + 8 / 8) * N
    off = estimate(N, spec(3, offload=True), sharded_build=True)
    assert (off.device_bytes, off.host_bytes) == (4 * N / 8, 12 * N / 8)
    # An unsharded build holds the full fp32 model on the host at start-up; a sharded one does not.
    assert estimate(N, spec(2), sharded_build=False).host_bytes == 4 * N
    assert estimate(N, spec(3), sharded_build=True).host_bytes == 0


def test_too_large_fails_with_the_estimate_and_the_settings():
    with pytest.raises(ValueError) as err:
        check_fits(7 * N, spec(1, world=2), sharded_build=False, budget_gb=24, gpu=True, local_ranks=2)
    msg = str(err.value)
    assert "model too large for the configured memory" in msg
    assert "7,000,000,000 parameters x (2 + 2 + 12/2) bytes" in msg and "65.2 GiB" in msg
    assert "train.memory_per_rank_gb=24" in msg
    assert "train.zero_stage=3" in msg and "train.offload_optimizer=true" in msg
    # ZeRO-3 on 8 ranks fits the same 24 GiB: 7e9 x 16 / 8 = 13 GiB.
    est = check_fits(7 * N, spec(3), sharded_build=True, budget_gb=24, gpu=True, local_ranks=8)
    assert est.device_bytes / GIB == pytest.approx(13.04, abs=0.01)


def test_cpu_counts_host_and_device_together():
    # On CPU the unsharded build's full copy and the model states share one memory.
    with pytest.raises(ValueError, match="full fp32 copy an unsharded build holds"):
        check_fits(N, spec(0, world=1), sharded_build=False, budget_gb=17, gpu=False, local_ranks=1)
    check_fits(N, spec(0, world=1), sharded_build=False, budget_gb=21, gpu=False, local_ranks=1)


def test_trainer_checks_before_building(tmp_path):
    over = [
        "train.memory_per_rank_gb=0.001",
        "train.zero_stage=1",
        "model.hidden_size=256",
        "model.num_layers=4",
    ]
    cfg = load_config(None, over)
    with pytest.raises(
        ValueError, match=r"7,309,568 parameters.*memory_per_rank_gb=0.001; change: train.zero_stage=3"
    ):
        check_memory(cfg, engine_spec(cfg, batch_geometry(cfg.train, 1)), 8000, sharded=False)
    ok = load_config(None, ["model.hidden_size=256", "model.num_layers=4"])  # 0 = the machine's memory
    check_memory(ok, engine_spec(ok, batch_geometry(ok.train, 1)), 8000, sharded=True)
    with pytest.raises(ValueError, match="train.memory_per_rank_gb"):
        load_config(None, ["train.memory_per_rank_gb=-1"])
