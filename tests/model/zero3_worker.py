"""One rank of the ZeRO-3 check (run by test_packed_zero3.py under torchrun, DS_ACCELERATOR=cpu).

For each variant (untied head; tied embeddings + activation checkpointing; tied embeddings with a
SmolLM2-sized 49,152-token vocabulary) it builds the same
tiny model on every rank, keeps an un-wrapped copy as the reference, wraps PackedCausalLM in a
DeepSpeed ZeRO-3 engine with every parameter partitioned, and checks on this rank's batch: the loss
equals the reference loss, the global gradient norm equals the norm of the rank-averaged reference
gradients, and one optimizer step runs and changes the loss. Rank 0 writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import pack_documents, random_docs, tiny_config  # noqa: E402

from cprec.model.build import build_model  # noqa: E402
from cprec.model.packed import MODEL_INPUT_KEYS, PackedCausalLM  # noqa: E402

VOCAB = 101
LARGE_VOCAB = 49_152  # SmolLM2's: the chunked loss and the partitioned tied head at real size
VARIANTS = [(False, VOCAB), (True, VOCAB), (True, LARGE_VOCAB)]


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
    }


def batch_for(rank: int, vocab: int = VOCAB) -> dict:
    docs = random_docs([9, 17, 3, 12, 1, 20, 6, 14][rank:] + [5, 7], seed=100 + rank, vocab=vocab)
    return {k: v for k, v in pack_documents(docs, 32)[0].items() if k in MODEL_INPUT_KEYS}


def check(tied: bool, vocab: int, rank: int, world: int) -> dict:
    import deepspeed

    # The tied variant also checkpoints activations (non-reentrant recompute under ZeRO-3 hooks).
    cfg = tiny_config(
        tie_word_embeddings=tied,
        gradient_checkpointing=tied,
        ce_backend="chunked",
        ce_chunk_size=16,
        attn_backend="loop",
    )
    model = build_model(cfg, vocab, seed=0)
    reference = PackedCausalLM(copy.deepcopy(model), cfg).train()
    # Reference: the loss on this rank's batch and gradients averaged over all ranks' batches.
    ref_loss = None
    for r in range(world):
        loss = reference(**batch_for(r, vocab)) / world
        loss.backward()
        if r == rank:
            ref_loss = float(loss) * world
    ref_norm = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in reference.parameters())))

    wrapper = PackedCausalLM(model, cfg).train()
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper, model_parameters=wrapper.parameters(), config=ds_config()
    )
    head = engine.module.hf_model.get_output_embeddings()
    partitioned = head.weight.numel() == 0  # outside its forward the head weight is an empty shard
    batch = batch_for(rank, vocab)
    loss = engine(**batch)
    engine.backward(loss)
    engine.step()
    ds_norm = float(engine.get_global_grad_norm())
    after = float(engine(**batch))
    engine.destroy()
    return {
        "tied": tied,
        "vocab": vocab,
        "rank": rank,
        "loss": float(loss),
        "ref_loss": ref_loss,
        "grad_norm": ds_norm,
        "ref_grad_norm": ref_norm,
        "loss_after_step": after,
        "head_partitioned": partitioned,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results = [check(tied, vocab, rank, world) for tied, vocab in VARIANTS]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        Path(args.out).write_text(json.dumps([r for rs in gathered for r in rs], indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's C++ teardown: after the six engines this worker builds and destroys,
    # it aborted now and then ("terminate called without an active exception", both ranks, after
    # the results were written). The results are checked by the test, not the exit path.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
