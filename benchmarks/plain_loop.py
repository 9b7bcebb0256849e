"""The plain sides of `benchmarks/train.py`: a plain packed PyTorch training loop, no DeepSpeed.

What one would write by hand around the same model: documents concatenated and cut into
``seq_len``-token rows (greedy, no padding; a document cut at a row end continues as a new segment
of the next row), labels shifted inside each segment, positions restarting per segment, bf16
autocast over fp32 weights, ``torch.optim.AdamW`` with its defaults plus weight decay on matrices,
global-norm clipping. No loader process, no engine, no checkpointing. The model runs through
`cprec.model.packed.PackedCausalLM` with the kernels ``cfg.model`` names: for the ``plain`` side
the hand-written ones (``attn_backend=sdpa``: one SDPA call per layer with a block-diagonal causal
mask; ``ce_backend=reference``: full logits), for ``plain_kernels`` CPRec's (``auto``), so the gap
between that side and ``cprec train`` is the engine's own overhead.
"""

from __future__ import annotations

import time

import torch

IGNORE = -100


def pack_rows(docs: list[list[int]], seq_len: int, rows: int, pad_id: int) -> dict:
    """``rows`` packed rows from the front of ``docs`` (consumed in place)."""
    ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((rows, seq_len), dtype=torch.long)
    bounds, longest, real = [0], 1, 0
    for r in range(rows):
        filled = 0
        while filled < seq_len and docs:
            piece = docs[0][: seq_len - filled]
            rest = docs[0][len(piece) :]
            if len(rest) >= 2:
                docs[0] = rest
            else:
                docs.pop(0)
            n = len(piece)
            t = torch.tensor(piece)
            ids[r, filled : filled + n] = t
            labels[r, filled : filled + n - 1] = t[1:]  # the segment's last token has no target
            pos[r, filled : filled + n] = torch.arange(n)
            filled += n
            bounds.append(r * seq_len + filled)
            longest = max(longest, n)
        real += filled
        if filled < seq_len:  # padding tail: its own segment
            bounds.append((r + 1) * seq_len)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    batch["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    batch["max_seqlen"] = longest
    return batch, real


def train_plain(
    cfg, vocab: int, pad_id: int, docs: list[list[int]], steps: int, warmup: int, micro_batch: int
) -> dict:
    """Train ``warmup + steps`` optimizer steps; throughput of the last ``steps`` (non-pad tokens).
    Packing is inside the timed step (it is part of what a loop costs)."""
    from cprec.model.build import build_model
    from cprec.model.packed import PackedCausalLM
    from cprec.runtime.engine import param_groups

    t = cfg.train
    hf = build_model(cfg.model, vocab, pad_token_id=pad_id, seed=t.seed)
    model = PackedCausalLM(hf, cfg.model)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=1e-8)
    docs = list(docs)
    times, cpu, tokens, losses = [], [], [], []
    for _ in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        batch, real = pack_rows(docs, t.seq_len, micro_batch, pad_id)
        loss = model(**batch)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        tokens.append(real)
    timed_tokens = sum(tokens[warmup:])
    seconds, cpu_seconds = sum(times[warmup:]), sum(cpu[warmup:])
    return {
        "timed_steps": steps,
        "tokens": timed_tokens,
        "seconds": seconds,
        "tokens_per_s": timed_tokens / seconds,
        "cpu_seconds": cpu_seconds,
        "tokens_per_cpu_s": timed_tokens / cpu_seconds,
        "tokens_per_step": timed_tokens / steps,
        "final_loss": losses[-1],
        "step_seconds": times[warmup:],
        "optimizer": "torch.optim.AdamW (defaults), weight decay on matrices",
        "kernels": {
            "attention": cfg.model.attn_backend,
            "loss": cfg.model.ce_backend,
            "norm": cfg.model.norm_backend,
            "mlp": cfg.model.mlp_backend,
        },
        "precision": "bf16 autocast, fp32 weights" if cfg.model.dtype == "bf16" else "fp32",
    }
