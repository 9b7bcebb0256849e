"""Full-ranking evaluation: throughput of the item cache, and ranking at catalogue scale.

Part ``encode`` (keys at the top level of the JSON):

Fast path (what `cprec eval` does): the domain catalogue is encoded once (or loaded from the item
cache), then per batch of users: encode the user prompts, one [B, H] x [H, I] matmul, mask history,
rank. Slow path (the baseline, measured in the same run): for each user, re-encode the whole
catalogue next to the user prompt, then score and rank — measured on a few users and extrapolated.

Data: the prepared food-kitchen folder when it exists (``--prepared``, default
out/prepared/food_kitchen: its tokenizer, one domain's catalogue, its test users), else a synthetic
catalogue with a tokenizer trained here. Model: a tiny random Llama (``--hidden``, ``--layers``).

Part ``scale`` (key ``catalogue_scale``): exact full ranking of random L2-normalised embeddings
(``--scale-dim``, 576 = SmolLM2-135M's hidden size; no model), ``--scale-items`` items x
``--scale-users`` users, each user with 0-20 random history items masked: the streaming path
(`cprec.eval.topk`, the job's full ranking of embedding rows: item chunks of ``--chunk``, top-50
lists kept as well) against today's dense path (`rank_task` with a dense score function: a
[batch, items] score matrix and exclude mask per batch), which here runs on ``--dense-users``
users of the same catalogue. Each path runs in a process of its own, so that its peak RSS is its
own; the embeddings themselves (items x dim x 4 bytes) are in both, and ``ranking_mb`` is the peak
RSS while ranking (reset after the set-up through /proc/self/clear_refs) above the RSS holding
them. The dense path's ranks are compared with the streaming path's on the users both ranked.

    taskset -c 0 python benchmarks/eval.py --out benchmarks/results/eval.json           # both parts
    taskset -c 0 python benchmarks/eval.py --part scale --out benchmarks/results/eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
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


# ----------------------------------------------------------------------------- catalogue scale
def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale_inputs(n_items: int, n_users: int, dim: int, seed: int = 0):
    """Random unit embeddings (items filled in place, chunk by chunk: no second copy), targets and
    0-20 history items per user."""
    g = torch.Generator().manual_seed(seed)
    items = torch.empty((n_items, dim), dtype=torch.float32)
    for s in range(0, n_items, 65536):
        block = items[s : s + 65536]
        torch.randn(block.shape, generator=g, out=block)
        block /= block.norm(dim=1, keepdim=True)
    users = torch.nn.functional.normalize(torch.randn((n_users, dim), generator=g), dim=-1)
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n_items, size=n_users).astype(np.int64)
    history = []
    for t in targets:
        h = np.unique(rng.integers(0, n_items, size=int(rng.integers(0, 21))))
        history.append(h[h != t].astype(np.int64))
    return users, items, targets, history


def scale_child(args) -> dict:
    """One path in this process: prints its JSON (timings, RSS) and saves its ranks."""
    from cprec.eval.topk import ItemShard, rank_users

    torch.set_num_threads(1)
    t = time.perf_counter()
    users, items, targets, history = scale_inputs(args.scale_items, args.scale_users, args.scale_dim)
    n = args.scale_users if args.child == "streaming" else args.dense_users
    users, targets, history = users[:n], targets[:n], history[:n]
    setup_s = time.perf_counter() - t
    setup_peak = _rss_mb("VmHWM")
    base = _rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on: the ranking's alone
    t = time.perf_counter()
    if args.child == "streaming":
        ranks, _, _ = rank_users(
            users, ItemShard.of(items), targets, history, args.scale_batch, args.chunk, 50
        )
    else:
        task = DomainTask("A", np.arange(args.scale_items), [None] * n, targets, history)
        ranks = rank_task(
            task, lambda tk, b: users[torch.as_tensor(b)] @ items.t(), batch_size=args.scale_batch
        )
    rank_s = time.perf_counter() - t
    np.save(args.ranks_out, ranks)
    peak = _rss_mb("VmHWM")
    return {
        "path": args.child,
        "items": args.scale_items,
        "users": n,
        "setup_s": round(setup_s, 2),
        "rank_s": round(rank_s, 2),
        "users_per_s": round(n / rank_s, 2),
        "rss_with_embeddings_mb": round(base, 1),
        "peak_rss_setup_mb": round(setup_peak, 1),
        "peak_rss_ranking_mb": round(peak, 1),
        "ranking_mb": round(peak - base, 1),
    }


def scale_benchmark(args, tmp: Path) -> dict:
    runs = {}
    for path in ("dense", "streaming"):
        cmd = [sys.executable, __file__, "--child", path, "--ranks-out", str(tmp / f"{path}.npy")]
        for name in ("scale_items", "scale_users", "scale_dim", "scale_batch", "chunk", "dense_users"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        log.info("scale: %s path (%s)", path, " ".join(cmd[2:]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        runs[path] = json.loads(out.strip().splitlines()[-1])
        log.info("scale: %s", runs[path])
    dense_r, stream_r = np.load(tmp / "dense.npy"), np.load(tmp / "streaming.npy")
    dense, stream = runs["dense"], runs["streaming"]
    emb_mb = args.scale_items * args.scale_dim * 4 / 2**20
    return {
        "what": "exact full ranking of random unit embeddings, history masked, pessimistic ties",
        "dim": args.scale_dim,
        "batch_users": args.scale_batch,
        "item_chunk": args.chunk,
        "topk_kept": 50,
        "threads": 1,
        "item_embeddings_mb": round(emb_mb, 1),
        "streaming": stream,
        "dense": dense,
        "dense_note": (
            f"today's dense path on the first {dense['users']} users of the same {dense['items']:,} items "
            f"(a [{args.scale_batch}, {dense['items']:,}] score matrix and mask per batch; its cost per "
            "user does not depend on the number of users)"
        ),
        "ranks_equal_on_shared_users": bool(np.array_equal(dense_r, stream_r[: len(dense_r)])),
        "ranking_memory_ratio_dense_over_streaming": round(
            dense["ranking_mb"] / max(stream["ranking_mb"], 1.0), 1
        ),
        "speedup_users_per_s": round(stream["users_per_s"] / dense["users_per_s"], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["all", "encode", "scale"])
    ap.add_argument("--scale-items", type=int, default=1_000_000)
    ap.add_argument("--scale-users", type=int, default=10_000)
    ap.add_argument("--scale-dim", type=int, default=576)
    ap.add_argument("--scale-batch", type=int, default=256, help="users per ranking batch (both paths)")
    ap.add_argument("--chunk", type=int, default=65536, help="items per chunk of the streaming path")
    ap.add_argument("--dense-users", type=int, default=1024, help="users ranked by the dense path")
    ap.add_argument("--child", default=None, choices=["dense", "streaming"], help=argparse.SUPPRESS)
    ap.add_argument("--ranks-out", default=None, help=argparse.SUPPRESS)
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
    if args.child:
        res = scale_child(args)
        print(json.dumps(res))
        return res
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="cprec-bench-eval-"))
    out = Path(args.out)
    result = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    if args.part in ("all", "encode"):
        result.update(encode_benchmark(args, tmp))
    if args.part in ("all", "scale"):
        result["catalogue_scale"] = scale_benchmark(args, tmp)
    result["machine"] = platform.processor() or platform.machine()
    print(json.dumps(result, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def encode_benchmark(args, tmp: Path) -> dict:
    """The item cache + one matmul per batch vs re-encoding the catalogue per user."""
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
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
