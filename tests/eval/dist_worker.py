"""Worker for test_dist.py, launched by torchrun with 2 ranks (gloo on CPU).

Encodes prompts with the item encoder spread over the ranks, fine-tunes a few steps in a ZeRO-0
engine (DeepSpeed averages the gradients), and has rank 0 save what the test compares: the
gathered embeddings and every rank's parameter checksum after fine-tuning.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from cprec.config import PromptConfig, load_config
from cprec.eval.encode import Encoder, PromptBuilder, load_model, load_tokenizer
from cprec.eval.finetune import build_pairs, finetune_to_folder
from cprec.eval.inputs import load_inputs
from cprec.runtime.dist import destroy_distributed, init_distributed


def main(prepared: str, model_dir: str, out: str) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    model = load_model(model_dir, torch.device("cpu"))
    tok = load_tokenizer(prepared)
    inputs = load_inputs(prepared, "test")
    builder = PromptBuilder(tok, PromptConfig(), 20)
    seqs = builder.item_ids(inputs.catalogue.texts)
    emb = Encoder(model, 0, "last", batch_size=4).encode(seqs)

    pairs, _ = build_pairs(inputs.train_sequences, inputs.catalogue)
    overrides = ["eval.finetune_epochs=0.3", "eval.finetune_batch_size=4", "eval.finetune_negatives=2"]
    cfg = load_config(None, [*overrides, "eval.finetune_lr=1e-3", "model.dtype=fp32"])
    folder = Path(out).with_name("finetuned")
    stats = finetune_to_folder(
        model,
        builder,
        inputs.catalogue,
        pairs,
        cfg,
        0,
        base_dir=Path(model_dir),
        folder=folder,
        key={},
        skipped={},
    )
    checksum = torch.tensor([sum(float(p.double().sum()) for p in model.parameters())], dtype=torch.float64)
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(info.world_size)]
    tdist.all_gather(sums, checksum)
    if info.is_main:
        torch.save({"emb": emb, "checksums": [float(s) for s in sums], "steps": stats["steps"]}, out)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
