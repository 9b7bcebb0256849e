"""Worker of test_topk.py's 2-rank test (torchrun, gloo on CPU): every rank keeps its slice of the
items and ranks the same users; rank 0 saves the merged ranks and top-k lists."""

from __future__ import annotations

import sys

import numpy as np
import torch
from topk_fixtures import integer_fixture, random_fixture

from cprec.eval.inputs import EvalUser
from cprec.eval.ranking import DomainTask, rank_task
from cprec.eval.topk import EmbeddingScorer, ItemShard, rank_users, shard_range
from cprec.runtime.dist import destroy_distributed, init_distributed


def main(out: str) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    got = {}
    for name, fixture in (("integer", integer_fixture), ("random", random_fixture)):
        users, items, targets, history = fixture()
        start, end = shard_range(len(items), info.rank, info.world_size)
        shard = ItemShard(items[start:end].clone(), start, len(items))
        ranks, vals, ids = rank_users(users, shard, targets, history, 16, 37, 20)
        got[name] = {"ranks": ranks, "vals": vals, "ids": ids}
    users, items, targets, history = integer_fixture()
    start, end = shard_range(len(items), info.rank, info.world_size)
    scorer = EmbeddingScorer({"A": users}, {"A": ItemShard(items[start:end].clone(), start, len(items))}, 50)
    task = DomainTask("A", np.arange(len(items)), [EvalUser(str(i), "A", [], "") for i in range(len(users))],
                      targets, history)  # fmt: skip
    got["scorer_ranks"] = rank_task(task, scorer, batch_size=16)
    got["shard_sizes"] = [e - s for s, e in (shard_range(len(items), r, info.world_size) for r in range(2))]
    if info.is_main:
        torch.save(got, out)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
