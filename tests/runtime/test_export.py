"""The export writer: large models go into several safetensors files plus an index, loadable as one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cprec.runtime.export import export_checkpoint

STEP = Path(__file__).resolve().parents[1] / "fixtures" / "ckpt_v1" / "checkpoints" / "step_0000002"


def test_split_export_loads_like_the_single_file(tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = Path(shutil.copytree(STEP.parent.parent, tmp_path / "run")) / "checkpoints" / STEP.name
    one = export_checkpoint(ckpt, tmp_path / "one")
    split = export_checkpoint(ckpt, tmp_path / "split", max_shard_bytes=20_000)
    assert (one / "model.safetensors").is_file() and not (one / "model.safetensors.index.json").exists()
    files = sorted(p.name for p in split.glob("model-*.safetensors"))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((split / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert not list(split.glob(".part-*"))
    a = AutoModelForCausalLM.from_pretrained(one).state_dict()
    b = AutoModelForCausalLM.from_pretrained(split).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((one / "config.json").read_text()) == json.loads((split / "config.json").read_text())
