"""Worker for test_zero3.py, launched by torchrun with 2 ranks (gloo, DS_ACCELERATOR=cpu):
``zero3_worker.py PREPARED MODEL_DIR OUT.pt``.

Loads the model ZeRO-3 partitioned for inference (`cprec.eval.zero3.load`, fp32 and bf16) and, with
batch sizes chosen so that the ranks hold different numbers of batches (one rank none at all, or a
cache hit), encodes items (``Encoder.encode``, ``encode_item_shard``) and users and runs the
generative passes (beam search, likelihoods) in lockstep. Rank 0 saves everything gathered, with
every rank's parameter status before and after the passes (partitioned or not) and the most
weights it held gathered at once while they ran (a forward hook on every module).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from cprec.config import PromptConfig
from cprec.eval import zero3
from cprec.eval.encode import (
    Encoder,
    ItemEmbeddingCache,
    PromptBuilder,
    encode_item_shard,
    encode_users,
    load_tokenizer,
)
from cprec.eval.generative import GenerativeScorer, _spread
from cprec.eval.inputs import load_inputs
from cprec.eval.ranking import build_tasks
from cprec.prepare.tokenize import special_ids

N_ITEMS = 9  # strided over 2 ranks: 5 and 4 prompts; 4 per batch: 2 batches and 1
USERS = 5  # generative passes: 3 users on rank 0, 2 on rank 1


def param_status(model) -> list[dict]:
    """Per parameter: full size, this rank's partition, elements of the full tensor held now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [
        {
            "name": name,
            "ds_numel": int(p.ds_numel),
            "partition": int(p.ds_tensor.numel()),
            "held": int(p.data.numel()),
            "available": p.ds_status == ZeroParamStatus.AVAILABLE,
            "persist": bool(getattr(p, "ds_persist", False)),
        }
        for name, p in model.named_parameters()
    ]


def gather(obj):
    parts = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, obj)
    return parts


def passes_inputs(prepared: str, tok) -> tuple:
    """What both sides encode and score: (special ids, catalogue, builder, item prompts, task A,
    user histories); the test's single-process reference uses the same."""
    ids = special_ids(tok)
    inputs = load_inputs(prepared, "test")
    cat = inputs.catalogue
    builder = PromptBuilder(tok, PromptConfig(), 20, 512)
    seqs = builder.item_ids(cat.texts[:N_ITEMS])
    task = build_tasks(inputs)["A"]
    return ids, cat, builder, seqs, task, [u.history for u in task.users][:N_ITEMS]


def main(prepared: str, model_dir: str, out: str) -> None:
    tok = load_tokenizer(prepared)
    ids, cat, builder, seqs, task, histories = passes_inputs(prepared, tok)

    lm = zero3.load(model_dir, torch.float32)
    rank = tdist.get_rank()
    before = param_status(lm)
    peak = {"encode": 0, "generative": 0}
    phase = ["encode"]

    def watch(module, args, output) -> None:  # after every module's pass: what is gathered now
        held = sum(p.data.numel() for p in lm.parameters())
        peak[phase[0]] = max(peak[phase[0]], held)

    hooks = [m.register_forward_hook(watch) for m in lm.hf_model.modules()]
    enc = Encoder(lm, ids["pad_id"], "last", batch_size=4)
    result = {
        "items": enc.encode(seqs),
        "one_item": enc.encode(seqs[:1]),  # rank 1 has nothing and pads
        "users": encode_users(enc, builder, cat, histories),
    }
    cache = ItemEmbeddingCache(Path(out).with_name(f"cache-{rank}"))
    first = encode_item_shard(enc, builder, cat, list(range(N_ITEMS)), cache, "zero3-test")
    if rank == 0:  # rank 0 misses its slice again, rank 1 hits: it must pad along
        for p in cache.folder.glob("items-*.pt"):
            p.unlink()
    again = encode_item_shard(enc, builder, cat, list(range(N_ITEMS)), cache, "zero3-test")
    encoded = param_status(lm)
    shard = {"start": first.start, "emb": first.embeddings, "again": again.embeddings, "hits": cache.hits}

    phase[0] = "generative"
    scorer = GenerativeScorer(lm, builder, cat, ids["eos_id"], ids["pad_id"], batch_size=1)
    hits = _spread(USERS, lambda us: scorer.search(task, us, 3), lambda: scorer.lockstep(task, 3))
    cols = list(range(task.n_items))

    def likelihoods(us: list[int]) -> dict[int, list[float]]:
        return dict(zip(us, scorer.likelihoods(task, us, [cols] * len(us))))

    lik = _spread(USERS, likelihoods, lambda: scorer.lockstep(task))
    result["hits"] = [h.hits for h in hits]
    result["likelihoods"] = lik
    after = param_status(lm)
    for h in hooks:
        h.remove()
    lm.close()

    lm16 = zero3.load(model_dir, torch.bfloat16)
    result["items_bf16"] = Encoder(lm16, ids["pad_id"], "last", batch_size=4).encode(seqs)
    dtypes = sorted({str(p.ds_tensor.dtype) for p in lm16.parameters()})
    lm16.close()

    ranks = gather(
        {
            "before": before,
            "encoded": encoded,
            "after": after,
            "peak": peak,
            "shard": shard,
            "bf16_dtypes": dtypes,
        }
    )
    if rank == 0:
        torch.save({**result, "ranks": ranks}, out)
    tdist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
