"""FAISS indexes of item embeddings: what `cprec embed --faiss` writes and ``eval.retrieval=faiss``
ranks through.

An index holds one domain's item embeddings (row i = the domain's i-th item, catalogue order) and
scores by inner product, which is the cosine similarity of the L2-normalised LLM embeddings. The
index type is a FAISS ``index_factory`` string (``eval.faiss_index``): ``Flat`` searches
exhaustively and is exact; any other (``HNSW32``, ``IVF1024,Flat``, ...) is approximate, and
reports say so.

Ranking through an index: per user, the index returns its best ``depth = max(eval.ks) + the user's
history length`` items; history items are dropped, and the target's rank is 1 + the retrieved
candidates scoring >= it (pessimistic ties, as everywhere). A target not retrieved ranks
``max(eval.ks) + 1``: beyond every reported cut-off (with a flat index, its true rank is at least
that), so all Recall/NDCG/MRR@K values are those of its ranks.

faiss-cpu is an optional dependency (``pip install 'cprec[faiss]'``); it is imported only here,
only when used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

INSTALL = "pip install 'cprec[faiss]' (or: pip install faiss-cpu)"


def import_faiss():
    """The faiss module, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"FAISS is not installed (eval.retrieval=faiss, --faiss): {INSTALL}") from e
    return faiss


def is_exact(factory: str) -> bool:
    """True for an exhaustive (flat) index: its search returns the exact top items."""
    return factory.replace(" ", "") == "Flat"


def describe(retrieval: str, factory: str) -> dict:
    """The report's ``retrieval`` entry: how embedding rows ranked the full catalogue."""
    if retrieval == "exact":
        return {"mode": "exact", "approximate": False, "label": "exact (streaming over every item)"}
    approx = not is_exact(factory)
    kind = "approximate" if approx else "exact"
    label = f"FAISS {factory} index ({kind})"
    return {"mode": "faiss", "index": factory, "approximate": approx, "label": label}


def build_index(embeddings: torch.Tensor | np.ndarray, factory: str = "Flat"):
    """An inner-product FAISS index of ``embeddings`` [N, H] (trained on them when its type needs it)."""
    faiss = import_faiss()
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"item embeddings must be [items, dim], got shape {x.shape}")
    try:
        index = faiss.index_factory(int(x.shape[1]), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"eval.faiss_index: FAISS cannot build {factory!r}: {e}") from None
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


def write_index(index, path: Path) -> None:
    faiss = import_faiss()
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))


def read_index(path: Path):
    return import_faiss().read_index(str(path))


def search(index, queries: torch.Tensor | np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, depth], item rows [Q, depth]; -1 = nothing there) of the best items per query."""
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    return index.search(q, int(depth))


class FaissRanker:
    """Full ranking of an `cprec.eval.topk.EmbeddingScorer`'s users through a FAISS index of each
    domain's items; dense scores (the sampled protocol) still come from the scorer."""

    sharded = False

    def __init__(self, scorer, factory: str, max_k: int):
        if scorer.sharded:
            raise ValueError("eval.retrieval=faiss needs every domain's whole item embeddings on each rank")
        self.scorer = scorer
        self.factory = factory
        self.max_k = max_k
        self.indexes = {d: build_index(s.embeddings, factory) for d, s in scorer.items.items()}

    def __call__(self, task, batch) -> torch.Tensor:
        return self.scorer(task, batch)

    def rank_full(self, task, batch_size: int) -> np.ndarray:
        index = self.indexes[task.domain]
        users = self.scorer.users[task.domain]
        out = np.empty(len(task.users), dtype=np.int64)
        for start in range(0, len(task.users), batch_size):
            batch = range(start, min(start + batch_size, len(task.users)))
            longest = max(len(task.history_cols[i]) for i in batch)
            depth = min(task.n_items, self.max_k + longest)
            scores, ids = search(index, users[batch.start : batch.stop], depth)
            for row, i in enumerate(batch):
                keep = (ids[row] >= 0) & ~np.isin(ids[row], task.history_cols[i])
                got, val = ids[row][keep], scores[row][keep]
                hit = np.flatnonzero(got == task.targets[i])
                if len(hit):
                    others = np.delete(val, hit[0])
                    out[i] = 1 + int(np.sum(others >= val[hit[0]]))
                else:
                    out[i] = self.max_k + 1
        return out
