"""Full-ranking evaluation throughput: item cache + one matmul per user batch vs re-encoding items.

Fast path (what `cprec eval` does): the domain catalogue is encoded once (or loaded from the item
cache), then per batch of users: encode the user prompts, one [B, H] x [H, I] matmul, mask history,
rank. Slow path (the baseline, measured in the same run): for each user, re-encode the whole
catalogue next to the user prompt, then score and rank — measured on a few users and extrapolated.

Data: the prepared food-kitchen folder when it exists (``--prepared``, default
out/prepared/food_kitchen: its tokenizer, one domain's catalogue, its test users), else a synthetic
catalogue with a tokenizer trained here. Model: a tiny random Llama (``--hidden``, ``--layers``).

    python benchmarks/eval.py --out benchmarks/results/eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cprec.config import PromptConfig
from cprec.eval.encode import (
    Encoder,
    ItemEmbeddingCache,
    PromptBuilder,
    encode_items,
    encode_users,
    load_tokenizer,
)
from cprec.eval.inputs import Catalogue, EvalInputs, EvalUser, load_inputs
from cprec.eval.ranking import DomainTask, build_tasks, rank_task

log = logging.getLogger("benchmarks.eval")
WORDS = "organic sweet salted dark roast green tea steel pan glass bowl wooden spoon knife set mug".split()


def synthetic_inputs(n_items: int, n_users: int, folder: Path) -> tuple[EvalInputs, object]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    rng = random.Random(0)
    titles = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f" {i}" for i in range(n_items)
    ]
    items = [f"i{i}" for i in range(n_items)]
    cat = Catalogue(items, ["A"] * n_items, titles, titles)
    users = [
        EvalUser(f"u{u}", "A", rng.sample(items, rng.randint(3, 20)), rng.choice(items))
        for u in range(n_users)
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(
        titles[:2000], trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(str(folder / "tokenizer"))
    return EvalInputs(cat, users, [], ["A"]), AutoTokenizer.from_pretrained(str(folder / "tokenizer"))


def tiny_model(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=3 * hidden,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", default="out/prepared/food_kitchen")
    ap.add_argument("--domain", default="A", help="domain whose catalogue is ranked (prepared data)")
    ap.add_argument("--users", type=int, default=256, help="users timed on the fast path")
    ap.add_argument("--slow-users", type=int, default=2, help="users timed on the slow path")
    ap.add_argument("--synthetic-items", type=int, default=5000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/eval.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="cprec-bench-eval-"))

    prepared = Path(args.prepared)
    if (prepared / "eval" / "items.parquet").is_file():
        inputs, tokenizer = load_inputs(prepared, "test"), load_tokenizer(prepared)
        source = f"{prepared} (domain {args.domain})"
        domain = args.domain
    else:
        log.info("%s not found: using a synthetic catalogue of %d items", prepared, args.synthetic_items)
        inputs, tokenizer = synthetic_inputs(args.synthetic_items, args.users, tmp)
        source, domain = f"synthetic ({args.synthetic_items} items)", "A"
    task = build_tasks(inputs, max_users=args.users, seed=0)[domain]
    rows = task.rows.tolist()
    model = tiny_model(len(tokenizer), args.hidden, args.layers)
    builder = PromptBuilder(tokenizer, PromptConfig(), max_history_items=20, max_len=2048)
    enc = Encoder(model, tokenizer.pad_token_id or 0, "last", args.batch_size)
    cache = ItemEmbeddingCache(tmp / "cache")
    cat = inputs.catalogue
    n_users = len(task.users)

    # --- fast path: items once (cold = encode + save; warm = cache load), users in batches + matmul
    t = time.perf_counter()
    items_emb = encode_items(enc, builder, cat, rows, cache, "bench-model")
    cold_items_s = time.perf_counter() - t
    t = time.perf_counter()
    items_emb = encode_items(enc, builder, cat, rows, cache, "bench-model")
    cache_load_s = time.perf_counter() - t
    assert cache.hits == 1
    t = time.perf_counter()
    users_emb = encode_users(enc, builder, cat, [u.history for u in task.users])
    ranks_fast = rank_task(
        task, lambda tk, b: users_emb[torch.as_tensor(b)] @ items_emb.t(), batch_size=args.batch_size
    )
    users_s = time.perf_counter() - t
    fast_ups = n_users / (cache_load_s + users_s)
    fast_cold_ups = n_users / (cold_items_s + users_s)

    # --- slow path: every user re-encodes the catalogue
    slow_n = min(args.slow_users, n_users)
    slow_ranks = []
    t = time.perf_counter()
    for i in range(slow_n):
        u = encode_users(enc, builder, cat, [task.users[i].history])
        v = enc.encode(builder.item_ids([cat.texts[r] for r in rows]), desc="items (re-encode)")
        one = DomainTask(domain, task.rows, [task.users[i]], task.targets[i : i + 1], [task.history_cols[i]])
        slow_ranks.append(rank_task(one, lambda tk, b, u=u, v=v: u @ v.t())[0])
    slow_s = time.perf_counter() - t
    slow_ups = slow_n / slow_s
    agree = bool(np.array_equal(np.asarray(slow_ranks), ranks_fast[:slow_n]))

    result = {
        "benchmark": "eval_full_ranking",
        "source": source,
        "items": len(rows),
        "users": n_users,
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "params": sum(p.numel() for p in model.parameters()),
        },
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "fast": {
            "cold_item_encode_s": round(cold_items_s, 3),
            "cache_load_s": round(cache_load_s, 4),
            "users_encode_rank_s": round(users_s, 3),
            "users_per_s_cached": round(fast_ups, 2),
            "users_per_s_cold_cache": round(fast_cold_ups, 2),
        },
        "slow": {"users_timed": slow_n, "seconds": round(slow_s, 3), "users_per_s": round(slow_ups, 4)},
        "speedup_cached": round(fast_ups / slow_ups, 1),
        "speedup_cold_cache": round(fast_cold_ups / slow_ups, 1),
        "goal": ">= 20x",
        "ranks_agree_on_slow_users": agree,
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
