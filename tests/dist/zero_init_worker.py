"""One rank of the sharded-vs-unsharded training check (run by test_zero_init_sharded.py under
torchrun, DS_ACCELERATOR=cpu): ``zero_init_worker.py FOLDER OUT.json``.

For each variant (bf16 and fp32 engines) it builds the model of local HF ``FOLDER`` twice, the
unsharded way (full model per rank, DeepSpeed partitions it in ``deepspeed.initialize``) and the
sharded way (``zero.Init``, every rank reads its slices), wraps each in the training engine
(ZeRO-3, `cprec.runtime.engine`) and trains one step on this rank's batch: loss, global gradient
norm and the loss after the step. It also checks that the sharded build is partitioned at
construction, that tied embeddings stay tied, and that growing the vocabulary works on partitions.
Rank 0 writes every rank's numbers as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))

from conftest import pack_documents, random_docs  # noqa: E402

from cprec.config import load_config  # noqa: E402
from cprec.model.build import build_model  # noqa: E402
from cprec.model.packed import MODEL_INPUT_KEYS  # noqa: E402
from cprec.runtime import engine as eng  # noqa: E402
from cprec.train.geometry import batch_geometry, engine_spec  # noqa: E402
from cprec.train.trainer import build_module  # noqa: E402

VOCAB = 101


def batch_for(rank: int) -> dict:
    docs = random_docs([9, 17, 3, 12, 1, 20, 6, 14][rank:] + [5, 7], seed=100 + rank, vocab=VOCAB)
    return {k: v for k, v in pack_documents(docs, 32)[0].items() if k in MODEL_INPUT_KEYS}


def one_step(cfg, sharded: bool, rank: int, world: int) -> dict:
    spec = engine_spec(cfg, batch_geometry(cfg.train, world))
    zero3 = eng.zero3_build_config(spec) if sharded else None
    torch.manual_seed(0)
    module, _ = build_module(cfg, {"vocab_size": VOCAB}, zero3=zero3)
    hf = module.hf_model
    built_partitioned = all(hasattr(p, "ds_tensor") for p in hf.parameters())
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    engine = eng.init_engine(module, spec)
    batch = batch_for(rank)
    loss = engine(**batch)
    engine.backward(loss)
    engine.step()
    row = {
        "sharded": sharded,
        "dtype": cfg.model.dtype,
        "rank": rank,
        "built_partitioned": built_partitioned,
        "tied": tied,
        "loss": float(loss),
        "grad_norm": float(engine.get_global_grad_norm()),
        "loss_after_step": float(engine(**batch)),
    }
    engine.destroy()
    return row


def grown_vocab(folder: Path, dtype: str) -> dict:
    """A tokenizer with more ids than the folder's rows: the partitioned embedding grows."""
    cfg = load_config(None, [f"model.name_or_path={folder}", f"model.dtype={dtype}"])
    spec = eng.EngineSpec(
        micro_batch_size=1, world_size=eng.dist_info().world_size, zero_stage=3, dtype=dtype
    )
    model = build_model(cfg.model, VOCAB + 27, zero3=eng.zero3_build_config(spec))
    emb = model.get_input_embeddings().weight
    # transformers builds the grown table unpartitioned (deepspeed.initialize partitions it), with
    # the folder's rows copied in: compare them with the file.
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(folder / index["model.embed_tokens.weight"]), framework="pt") as f:
        saved = f.get_tensor("model.embed_tokens.weight")
    return {
        "rows": int(getattr(emb, "ds_shape", emb.shape)[0]),
        "config_vocab": int(model.config.vocab_size),
        "tied_after_resize": model.get_output_embeddings().weight is emb,
        "old_rows_kept": bool(torch.equal(emb.data[:VOCAB].float(), saved.to(emb.dtype).float())),
    }


def main(folder: Path, out: Path) -> None:
    info = eng.start_distributed()
    rows = []
    for dtype in ("bf16", "fp32"):
        cfg = load_config(
            None,
            [
                f"model.name_or_path={folder}",
                f"model.dtype={dtype}",
                "model.attn_backend=loop",
                "model.ce_backend=chunked",
                "model.ce_chunk_size=16",
                "train.zero_stage=3",
                "train.micro_batch_size=1",
                "train.seq_len=32",
                "train.lr=1e-2",
                "train.weight_decay=0.1",
            ],
        )
        for sharded in (False, True):
            rows.append(one_step(cfg, sharded, info.rank, info.world_size))
    extra = grown_vocab(folder, "bf16")
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, {"rows": rows, "grown": extra})
    if info.is_main:
        out.write_text(json.dumps(gathered, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
