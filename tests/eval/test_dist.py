"""Distributed encoding and fine-tuning with 2 ranks (torchrun, gloo on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrun_job import torchrun

from cprec.config import PromptConfig
from cprec.eval.encode import Encoder, PromptBuilder, load_model
from cprec.eval.inputs import load_inputs


@pytest.mark.dist
def test_two_rank_encoding_matches_one_process_and_finetune_stays_in_sync(
    tiny_prepared, tiny_model_dir, tiny_tokenizer, tmp_path
):
    out = tmp_path / "dist.pt"
    worker = Path(__file__).with_name("dist_worker.py")
    proc = torchrun([str(worker), str(tiny_prepared), str(tiny_model_dir), str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:]
    got = torch.load(out, weights_only=True)

    model = load_model(tiny_model_dir, torch.device("cpu"))
    cat = load_inputs(tiny_prepared, "test").catalogue
    seqs = PromptBuilder(tiny_tokenizer, PromptConfig(), 20).item_ids(cat.texts)
    single = Encoder(model, 0, "last", batch_size=4).encode(seqs)
    torch.testing.assert_close(got["emb"], single, atol=1e-5, rtol=1e-4)
    a, b = got["checksums"]
    assert a == pytest.approx(b, rel=1e-9)  # both ranks applied the same averaged updates
    assert got["steps"] == 3  # ceil(0.3 * 60 pairs / (4 per rank * 2 ranks))
