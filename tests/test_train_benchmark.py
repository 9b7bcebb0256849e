"""benchmarks/train.py without running it: the plain loop's packing, A/B variants, the README table
(regenerated from the committed JSON, so README and JSON cannot drift apart)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cprec_kernels.segments import check_bounds

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train_bench = load("train")
plain = load("plain_loop")


def test_plain_loop_packs_full_rows_without_crossing_documents():
    docs = [list(range(100, 100 + n)) for n in (5, 9, 3, 12, 7, 2, 30)]
    total = sum(map(len, docs))
    batch, real = plain.pack_rows(docs, seq_len=8, rows=3, pad_id=0)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    bounds = batch["cu_seqlens"].tolist()
    check_bounds(bounds, 3, 8)  # row-local segments, every row start a boundary
    assert real == 24 and not (ids == 0).any()  # greedy: rows filled, a cut document continues
    flat_ids, flat_labels, flat_pos = ids.view(-1), labels.view(-1), pos.view(-1)
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert flat_pos[a:b].tolist() == list(range(b - a))  # positions restart per segment
        assert flat_labels[a : b - 1].tolist() == flat_ids[a + 1 : b].tolist()  # next token, same doc
        assert flat_labels[b - 1] == -100  # never the first token of the next document
        assert batch["max_seqlen"] >= b - a
    # Consumed in place: what is left continues where the rows stopped.
    assert sum(map(len, docs)) + real <= total and docs[0][0] == ids[-1, -1] + 1


def test_plain_loop_pads_the_last_row_as_its_own_segment():
    batch, real = plain.pack_rows([[5, 6, 7]], seq_len=8, rows=2, pad_id=0)
    assert real == 3 and batch["cu_seqlens"].tolist() == [0, 3, 8, 16]
    assert (batch["labels"].view(-1)[2:] == -100).all()


def test_variants_parse_and_name_their_side():
    assert train_bench.parse_variants(["zero1:train.zero_stage=1", "x:a=1;b=2"]) == {
        "zero1": ["train.zero_stage=1"],
        "x": ["a=1", "b=2"],
    }
    with pytest.raises(ValueError, match="NAME:key=value"):
        train_bench.parse_variants(["zero1"])


def test_readme_table_is_the_committed_json():
    results = json.loads((REPO / "benchmarks" / "results" / "train.json").read_text())
    keys = [(e["model"], e.get("ranks", 1)) for e in results["models"]]
    assert len(keys) == len(set(keys)) and {m for m, _ in keys} <= set(train_bench.MODELS)
    for e in results["models"]:
        med = {k: v["tokens_per_s"]["median"] for k, v in e["sides"].items()}
        if "hf_trainer" in med:
            assert e["speedup"] == pytest.approx(med["cprec"] / med["hf_trainer"])
        if train_bench.ONE_RANK in med:  # an N-rank entry carries its 1-rank baseline of the same run
            assert e["ranks"] > 1 and e["scaling_vs_1_rank"] == pytest.approx(
                med["cprec"] / med["cprec_1rank"]
            )
        for side, attention in (("plain", "sdpa"), ("plain_kernels", "auto")):  # what each loop ran
            for run in e["sides"].get(side, {}).get("runs", []):
                assert run["kernels"]["attention"] == attention, (e["model"], side)
        p = e["sides"]["cprec"]["pinning"]
        assert p["affinity"] and p["torch_threads"] == e["run"]["pinning"]["threads"]
    md = train_bench.table(results)
    for name, spec in train_bench.MODELS.items():  # measured rows and the ones still to run
        assert (f"| {name} " in md) == bool(spec.prepared or name in {m for m, _ in keys})
    start, end = train_bench.README_MARKERS
    readme = (REPO / "README.md").read_text()
    assert readme.split(start, 1)[1].split(end, 1)[0] == "\n" + md


def test_write_readme_replaces_only_between_markers(tmp_path):
    start, end = train_bench.README_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{start}\nold\n{end}\ntail\n")
    train_bench.write_readme("new table\n", readme)
    assert readme.read_text() == f"head\n{start}\nnew table\n{end}\ntail\n"
