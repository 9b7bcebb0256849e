"""Full ranking of embedding models at catalogue scale: streaming exact top-k and target ranks.

The dense path (`cprec.eval.ranking.rank_task`) builds a [batch, items] score matrix and a dense
exclude mask of the same size per batch of users. Here a batch of users goes over the catalogue
in chunks of ``chunk`` items instead, keeping per user

- the target's rank by the rule of `cprec.eval.metrics.target_ranks` (pessimistic ties: 1 + the
  candidates scoring >= the target; a NaN score beats the target; a NaN target score ranks last),
- optionally a running top-k (history excluded; ties broken by the lower column, i.e. catalogue
  order; a NaN score sorts first, as +inf),

while masking only the user's own history entries (a gather of those few scores per chunk, never
a mask over the chunk). Memory is O(batch x chunk) scores; no [users, items] or [batch, items]
tensor is ever made.

Under torch.distributed, each rank holds a contiguous slice of every domain's item embeddings
(`ItemShard`, `shard_range`): it ranks the batch against its slice, the per-rank counts are summed
with ``all_reduce`` and the per-rank top-k lists merged after an ``all_gather`` (tensors only).
Every rank must call the ranking with the same users in the same order.

Why scores are padded: a float32 matmul's last bit depends on the kernel BLAS picks, and BLAS
takes another kernel for a tiny dimension (a 3-item tail chunk or a single user runs as a
matrix-vector product). Every product here has both sides padded to a multiple of ``PAD`` rows, so
the score of a (user, item) pair is the same whichever chunk, batch or rank computed it, and the
target's score (from a product with the gathered target embeddings) equals its score in its own
chunk. The dense path computes one [batch, items] product; on integer-valued fixtures both are
exact and the ranks equal, ties included (tests/eval/test_topk.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist

PAD = 64
"""Rows of both matmul operands are padded to a multiple of this (see the module docstring)."""


# ------------------------------------------------------------------------------------ sharding
def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, end) columns rank ``rank`` of ``world`` holds out of ``n`` (contiguous, sizes
    differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def dist_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _comm_device(x: torch.Tensor) -> torch.device:
    """Where a collective's tensors must live: NCCL only moves GPU tensors."""
    if tdist.get_backend() == "nccl" and x.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks (a new tensor on x's device)."""
    y = x.to(_comm_device(x))
    tdist.all_reduce(y)
    return y.to(x.device)


def all_gather_cat(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all), concatenated along ``dim`` in rank order."""
    y = x.to(_comm_device(x))
    parts = [torch.empty_like(y) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, y)
    return torch.cat(parts, dim).to(x.device)


@dataclass
class ItemShard:
    """One rank's contiguous slice of a domain's item embeddings (the whole domain with one rank)."""

    embeddings: torch.Tensor
    """[end - start, H] float32: row r is the item of column start + r."""
    start: int
    """Column (in the domain task's order) of the first row."""
    total: int
    """Columns of the whole domain (every rank's slices together)."""
    spread: bool = False
    """One of the slices `cprec.eval.encode.encode_item_shard` spreads over the ranks: never whole,
    even where this rank's slice is all of a domain with fewer items than ranks."""

    @property
    def end(self) -> int:
        return self.start + len(self.embeddings)

    @property
    def whole(self) -> bool:
        """This rank holds the whole domain: its ranking is its own (no collective; rank 0 alone may
        rank), while ranks holding slices rank together."""
        return not self.spread and self.start == 0 and self.end == self.total

    @staticmethod
    def of(embeddings: torch.Tensor) -> ItemShard:
        """A shard holding the whole domain."""
        return ItemShard(embeddings, 0, len(embeddings))


# ------------------------------------------------------------------------------------ ranking
def _round_up(n: int, m: int = PAD) -> int:
    return -(-n // m) * m


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    if len(x) == rows:
        return x.contiguous()
    out = torch.zeros((rows, x.shape[1]), dtype=x.dtype, device=x.device)
    out[: len(x)] = x
    return out


def _may_be_nan(users: torch.Tensor, items: torch.Tensor) -> bool:
    """False when no score can be NaN: all finite and no dot product can overflow float32. (One
    pass of ``aminmax``, which propagates NaN, over each: no copy of the embeddings.)"""
    if users.numel() == 0 or items.numel() == 0:
        return False
    bound = float(users.shape[1])
    for x in (users, items):
        lo, hi = torch.aminmax(x)
        bound *= max(-float(lo), float(hi))  # NaN or inf in x: the bound is NaN or inf
    return not bound < 1e37


def _merge_topk(vals: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of lists given in ascending column order among equal values (see `_chunk_topk`):
    score descending, lower column first among ties, empty slots (id -1) last."""
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    vals, ids = vals.gather(1, order), ids.gather(1, order)
    order = torch.sort((ids < 0).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    return vals.gather(1, order), ids.gather(1, order)


def _chunk_topk(
    s: torch.Tensor, k: int, rows: torch.Tensor, cols: torch.Tensor, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one chunk's scores ``s`` [B, w] whose history entries (``rows``, ``cols`` local)
    are already -inf: values [B, k] and global columns (-1 = empty), in (score desc, column asc)."""
    b, w = s.shape
    keys = rows * w + cols  # history entries, so that a -inf history item never fills a slot
    kk = min(k, w)
    if w > kk:
        top = s.topk(kk + 1, dim=1)
        vals, idx = top.values[:, :kk], top.indices[:, :kk]
        # A tie across the k-th place: which of the tied items is in is decided by the column.
        tied = (top.values[:, kk - 1] == top.values[:, kk]).nonzero().flatten().tolist()
    else:
        vals, idx = s, torch.arange(w, device=s.device).expand(b, w).clone()
        tied = []
    order = torch.sort(idx, dim=1).indices
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    vals, idx = vals.gather(1, order).clone(), idx.gather(1, order).clone()
    for r in tied:
        cand = (s[r] >= vals[r, kk - 1]).nonzero().flatten()  # ascending columns
        cand = cand[~torch.isin(r * w + cand, keys)]
        v = s[r, cand]
        o = torch.sort(v, descending=True, stable=True).indices[:kk]
        vals[r, : len(o)], idx[r, : len(o)] = v[o], cand[o]
        idx[r, len(o) :] = -1
    flat = torch.arange(b, device=s.device).unsqueeze(1) * w + idx
    empty = (idx < 0) | torch.isin(flat, keys)
    ids = torch.where(empty, torch.full_like(idx, -1), idx + start)
    if kk < k:
        fill = (b, k - kk)
        vals = torch.cat([vals, torch.full(fill, -torch.inf, dtype=vals.dtype, device=vals.device)], 1)
        ids = torch.cat([ids, torch.full(fill, -1, dtype=ids.dtype, device=ids.device)], 1)
    return vals, ids


def stream_rank(
    users: torch.Tensor,
    target_emb: torch.Tensor,
    shard: ItemShard,
    targets: np.ndarray,
    history: list[np.ndarray],
    chunk: int,
    k: int = 0,
    may_be_nan: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Ranks of one batch of users' targets over the whole domain, and their top-k.

    Args:
        users: [B, H] user embeddings (every rank the same).
        target_emb: [B, H] embeddings of the users' targets (every rank the same).
        shard: this rank's slice of the domain's item embeddings.
        targets: [B] target columns (global).
        history: per user, the global columns of its history items (the target's removed).
        chunk: items scored per matmul.
        k: length of the top-k lists (0 = no top-k).
        may_be_nan: whether a score can be NaN (None = find out from the embeddings; callers
            ranking many batches find out once).

    Returns:
        (int64 [B] ranks, float [B, k] top scores, int64 [B, k] top columns with -1 = empty), the
        top-k None when ``k`` is 0. Over slices spread on the ranks every rank gets the merged result.
    """
    rank, world = dist_world()
    if world == 1 and not shard.whole:
        raise ValueError(f"item shard [{shard.start}, {shard.end}) of {shard.total} without a process group")
    dev = shard.embeddings.device
    b = len(users)
    bp = _round_up(max(b, 1))
    u = _padded(users.to(dev, torch.float32), bp)
    t = (u @ _padded(target_emb.to(dev, torch.float32), bp).t()).diagonal()[:b].clone()
    items = shard.embeddings
    nan = _may_be_nan(u, items) if may_be_nan is None else may_be_nan
    counts = torch.zeros(b, dtype=torch.long, device=dev)

    # Entries to leave out of the counts: history (each once, never the target) and the target
    # itself (its own score >= itself); only the history is left out of the top-k.
    n = max(shard.total, 1)
    tg = np.asarray(targets, dtype=np.int64)
    keys = np.concatenate([np.asarray(h, dtype=np.int64) + i * n for i, h in enumerate(history)] or [[]])
    keys = np.setdiff1d(keys.astype(np.int64), tg + np.arange(b) * n)  # unique, target removed
    lens = np.bincount(keys // n, minlength=b)[:b]
    ex_rows = np.concatenate([keys // n, np.arange(b)])
    ex_cols = np.concatenate([keys % n, tg])
    is_hist = np.concatenate([np.ones(len(keys), dtype=bool), np.zeros(b, dtype=bool)])
    mine = (ex_cols >= shard.start) & (ex_cols < shard.end)
    order = np.argsort(ex_cols[mine], kind="stable")
    ex_rows = torch.from_numpy(ex_rows[mine][order]).to(dev)
    ex_cols = torch.from_numpy(ex_cols[mine][order] - shard.start).to(dev)
    is_hist = torch.from_numpy(is_hist[mine][order]).to(dev)

    top_v = torch.full((b, k), -torch.inf, device=dev) if k else None
    top_i = torch.full((b, k), -1, dtype=torch.long, device=dev) if k else None
    n_local = len(items)
    for cs in range(0, n_local, chunk):
        ce = min(cs + chunk, n_local)
        w = ce - cs
        s = (u @ _padded(items[cs:ce], _round_up(w)).t())[:b, :w]
        counts += (s >= t.unsqueeze(1)).sum(dim=1)
        if nan:
            counts += torch.isnan(s).sum(dim=1)
        lo, hi = torch.searchsorted(ex_cols, torch.tensor([cs, ce], device=dev)).tolist()
        r, c = ex_rows[lo:hi], ex_cols[lo:hi] - cs
        v = s[r, c]
        beat = (v >= t[r]) | torch.isnan(v)
        counts -= torch.bincount(r[beat], minlength=b)
        if k:
            if nan:
                s = torch.nan_to_num(s, nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)
            h = is_hist[lo:hi]
            s[r[h], c[h]] = -torch.inf
            cv, ci = _chunk_topk(s, k, r[h], c[h], shard.start + cs)
            top_v, top_i = _merge_topk(torch.cat([top_v, cv], 1), torch.cat([top_i, ci], 1), k)

    if world > 1 and not shard.whole:  # a whole shard's counts are complete (and only rank 0 ranks)
        counts = all_reduce_sum(counts)
        if k:  # rank r's columns all come before rank r + 1's: the merge keeps the tie order
            top_v, top_i = _merge_topk(all_gather_cat(top_v), all_gather_cat(top_i), k)
    ranks = 1 + counts
    nan_t = torch.isnan(t)
    if nan_t.any():  # every candidate beats a NaN target: last among the user's candidates
        n_cand = torch.from_numpy(shard.total - lens).to(dev)
        ranks = torch.where(nan_t, n_cand, ranks)
    return ranks, top_v, top_i


def gather_rows(shard: ItemShard, cols: np.ndarray) -> torch.Tensor:
    """Embeddings [len(cols), H] of global columns, whichever rank holds them (every rank gets
    them: each fills its own rows, zeros elsewhere, summed with ``all_reduce``, which is exact)."""
    cols = np.asarray(cols, dtype=np.int64)
    emb = shard.embeddings
    out = torch.zeros((len(cols), emb.shape[1]), dtype=torch.float32, device=emb.device)
    mine = (cols >= shard.start) & (cols < shard.end)
    idx = torch.from_numpy(np.flatnonzero(mine)).to(emb.device)
    out[idx] = emb[torch.from_numpy(cols[mine] - shard.start).to(emb.device)].float()
    return all_reduce_sum(out) if dist_world()[1] > 1 and not shard.whole else out


def rank_users(
    users: torch.Tensor,
    shard: ItemShard,
    targets: np.ndarray,
    history: list[np.ndarray],
    batch_size: int,
    chunk: int,
    k: int = 0,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`stream_rank` over all users in batches: (ranks [U], top scores [U, k], top columns [U, k])."""
    target_emb = gather_rows(shard, targets)
    nan = _may_be_nan(users, shard.embeddings)
    ranks, vals, ids = [], [], []
    for s in range(0, len(users), batch_size):
        sl = slice(s, min(s + batch_size, len(users)))
        r, v, i = stream_rank(users[sl], target_emb[sl], shard, targets[sl], history[sl], chunk, k, nan)
        ranks.append(r.cpu().numpy())
        if k:
            vals.append(v.cpu().numpy())
            ids.append(i.cpu().numpy())
    cat = np.concatenate
    if not ranks:
        empty = np.zeros((0, k))
        return np.zeros(0, dtype=np.int64), (empty if k else None), (empty.astype(np.int64) if k else None)
    return cat(ranks), (cat(vals) if k else None), (cat(ids) if k else None)


# ------------------------------------------------------------------------------------ scorer
class EmbeddingScorer:
    """Scores = user embedding . item embedding, per domain.

    A `cprec.eval.ranking.ScoreFn` (the dense [B, I] scores, for the sampled protocol and the
    re-ranker; needs every domain's whole item embeddings) and a full ranker (`rank_full`, which
    `rank_task` uses for the full protocol): streaming over item chunks, sharded over ranks when
    the item shards are slices.
    """

    def __init__(self, users: dict[str, torch.Tensor], items: dict[str, ItemShard], chunk: int = 65536):
        self.users = users
        self.items = items
        self.chunk = chunk

    @property
    def sharded(self) -> bool:
        """True when some domain's items are held in slices over the ranks: then every rank must
        rank together (`rank_full`) and the dense scores are not available."""
        return any(not s.whole for s in self.items.values())

    def __call__(self, task, batch) -> torch.Tensor:
        shard = self.items[task.domain]
        if not shard.whole:
            raise ValueError(
                f"dense scores of domain {task.domain!r} need its whole item embeddings; this rank "
                f"holds items [{shard.start}, {shard.end}) of {shard.total}"
            )
        return self.users[task.domain][torch.as_tensor(batch)] @ shard.embeddings.t()

    def rank_full(self, task, batch_size: int) -> np.ndarray:
        """Target ranks of the task's users over the whole domain catalogue (history masked)."""
        return self.topk(task, 0, batch_size)[0]

    def topk(self, task, k: int, batch_size: int):
        """(ranks [U], top-k scores [U, k], top-k columns [U, k]) of the task's users."""
        shard = self.items[task.domain]
        if shard.total != task.n_items:
            raise ValueError(f"domain {task.domain!r}: {shard.total} item embeddings, {task.n_items} items")
        return rank_users(
            self.users[task.domain], shard, task.targets, task.history_cols, batch_size, self.chunk, k
        )
