"""Distributed encoding and fine-tuning with 2 ranks (torchrun, gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cprec.config import PromptConfig
from cprec.eval.encode import Encoder, PromptBuilder, load_model
from cprec.eval.inputs import load_inputs


@pytest.mark.dist
def test_two_rank_encoding_matches_one_process_and_finetune_stays_in_sync(
    tiny_prepared, tiny_model_dir, tiny_tokenizer, tmp_path
):
    out = tmp_path / "dist.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # the OS picks a free rendezvous port: no clash with other jobs
        str(Path(__file__).with_name("dist_worker.py")),
        str(tiny_prepared),
        str(tiny_model_dir),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)

    model = load_model(tiny_model_dir, torch.device("cpu"))
    cat = load_inputs(tiny_prepared, "test").catalogue
    seqs = PromptBuilder(tiny_tokenizer, PromptConfig(), 20).item_ids(cat.texts)
    single = Encoder(model, 0, "last", batch_size=4).encode(seqs)
    torch.testing.assert_close(got["emb"], single, atol=1e-5, rtol=1e-4)
    a, b = got["checksums"]
    assert a == pytest.approx(b, rel=1e-9)  # both ranks applied the same averaged updates
    assert got["steps"] == 3  # ceil(0.3 * 60 pairs / (4 per rank * 2 ranks))
