"""Worker for the export test: logits of a checkpoint computed by the DeepSpeed engine itself.

Run under torchrun with the world size the checkpoint was written with:
    python -m torch.distributed.run --nproc_per_node 2 tests/dist/engine_logits.py CKPT OUT.pt
Every rank runs the forward (ZeRO-3 gathers the parameter shards collectively); rank 0 saves the
bf16 logits of the engine's module and the full fp32 master weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cprec.runtime import dist
from cprec.config import config_from_dict
from cprec.runtime import checkpoint as ckpt_io
from cprec.runtime import engine as eng
from cprec.train.geometry import batch_geometry, engine_spec
from cprec.train.trainer import build_module


def main(ckpt: Path, out: Path) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    info = eng.start_distributed()
    state = ckpt_io.read_state(ckpt)
    cfg = config_from_dict(state["config"])
    tok = {"vocab_size": state["vocab_size"], **state["tokenizer_ids"]}
    module, _ = build_module(cfg, tok)
    engine = eng.init_engine(module, engine_spec(cfg, batch_geometry(cfg.train, info.world_size)))
    ckpt_io.load(engine, ckpt, universal=False)
    engine.eval()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, state["vocab_size"], (2, 24), generator=g)
    position_ids = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        logits = engine.module.hf_model(input_ids=input_ids, position_ids=position_ids).logits
    masters = {n: safe_get_full_fp32_param(p) for n, p in engine.module.hf_model.named_parameters()}
    if info.is_main:
        torch.save({"input_ids": input_ids, "logits": logits.float(), "fp32": masters}, out)
    dist.barrier()
    dist.destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
