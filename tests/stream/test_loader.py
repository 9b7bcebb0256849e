"""The streaming loader on real webdataset tars written here (see shard_factory.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from shard_factory import write_prepared

from cprec.config import load_config
from cprec.stream.docstream import epoch_units
from cprec.stream.loader import PackedLoader, build_loader, manifest_folder, resolve_shards
from cprec.stream.packing import IGNORE_INDEX
from cprec.stream.settings import LoaderSettings, loader_settings
from cprec.stream.tars import ShardError, iter_tar_samples


def make_loader(root: Path, **kw) -> PackedLoader:
    urls, manifest = resolve_shards(str(root))
    opts = dict(seq_len=32, batch_size=2, seed=7, shuffle_buffer=16, chunk_docs=8, log_every=0)
    opts.update(kw)
    rank, world_size = opts.pop("rank", 0), opts.pop("world_size", 1)
    return PackedLoader(urls, LoaderSettings(**opts), manifest=manifest, rank=rank, world_size=world_size)


def one_epoch(loader: PackedLoader, epoch: int = 0) -> list[str]:
    """Keys of ``epoch``'s documents, read until every worker of this rank has moved past it."""
    keys = []
    for d in loader.iter_documents():
        if d.epoch == epoch:
            keys.append(d.key)
        if min(loader.epochs().values()) > epoch:
            break
    return keys


# ---------------------------------------------------------------------------- exactly once
@pytest.mark.parametrize("n_shards", [1, 3, 4, 5, 7, 8, 13])
@pytest.mark.parametrize("n_global", [1, 2, 4, 6])
def test_epoch_units_cover_every_sample_once(n_shards, n_global):
    per = epoch_units(n_shards, n_global, seed=3, epoch=1)
    assert len(per) == n_global
    samples = 12
    seen = Counter()
    for units in per:
        for shard, part, parts in units:
            seen.update((shard, j) for j in range(samples) if j % parts == part)
    assert seen == Counter({(s, j): 1 for s in range(n_shards) for j in range(samples)})
    # Balanced: shares differ by at most one unit of the smallest size.
    loads = [sum(1 / p for _, _, p in u) for u in per]
    assert max(loads) - min(loads) <= 1 + 1e-9
    assert epoch_units(n_shards, n_global, 3, 1) == per  # deterministic


@pytest.mark.parametrize("n_shards", [7, 3])
def test_two_ranks_two_workers_see_every_sample_exactly_once(tmp_path, n_shards):
    info = write_prepared(tmp_path, n_shards=n_shards)
    keys = []
    for rank in range(2):
        loader = make_loader(tmp_path, rank=rank, world_size=2, num_workers=2)
        got = one_epoch(loader)
        assert got, f"rank {rank} got no document"
        keys += got
    dup = [k for k, c in Counter(keys).items() if c > 1]
    assert not dup, f"seen twice: {dup[:5]}"
    assert sorted(keys) == sorted(info["docs"])


def test_documents_carry_the_tokens_written(tmp_path):
    info = write_prepared(tmp_path, n_shards=2)
    loader = make_loader(tmp_path)
    for d in list(zip(range(50), loader.iter_documents())):
        doc = d[1]
        assert doc.tokens.tolist() == info["docs"][doc.key].tolist()
        assert doc.stream == info["streams"][doc.key]


def test_epochs_are_shuffled_differently(tmp_path):
    write_prepared(tmp_path, n_shards=3)
    loader = make_loader(tmp_path)
    it = loader.iter_documents()
    n = 120  # documents written by default
    first = [next(it).key for _ in range(n)]
    second = [next(it).key for _ in range(n)]
    assert sorted(first) == sorted(second) and first != second


# ---------------------------------------------------------------------------- batches
def test_build_loader_from_config_yields_contract_batches(tmp_path):
    write_prepared(tmp_path, n_shards=2)
    cfg = load_config(
        None, [f"data.output_dir={tmp_path}", "train.seq_len=64", "train.micro_batch_size=3", "train.seed=1"]
    )
    loader = build_loader(loader_settings(cfg), rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (3, 64) and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"][-1] == 3 * 64
    assert isinstance(batch["max_seqlen"], int) and batch["n_tokens"] == 3 * 64  # greedy: no padding
    assert sum(batch["stream_tokens"].values()) == batch["n_tokens"]
    # Labels are the next token inside a segment and -100 at every segment end.
    cu = batch["cu_seqlens"].tolist()
    flat_ids, flat_lab = batch["input_ids"].flatten(), batch["labels"].flatten()
    for a, e in zip(cu, cu[1:]):
        assert flat_lab[a : e - 1].tolist() == flat_ids[a + 1 : e].tolist()
        assert flat_lab[e - 1] == IGNORE_INDEX
        assert batch["position_ids"].flatten()[a:e].tolist() == list(range(e - a))
    loader.close()


def test_loader_settings_are_read_from_the_config_once(tmp_path):
    cfg = load_config(
        None,
        [
            f"data.output_dir={tmp_path}",
            "train.seq_len=48",
            "train.micro_batch_size=3",
            "train.seed=5",
            "train.log_every=2",
            "train.loader.shuffle_buffer=7",
            "train.loader.num_workers=1",
            "train.loader.packing=bestfit",
            "train.loader.bestfit_buffer=9",
            "train.loader.on_corrupt=skip",
            "train.loader.verify=false",
            "train.loader.mixing={A/domain: 2.0, B/domain: 1.0}",
        ],
    )
    s = loader_settings(cfg)
    assert s == LoaderSettings(
        shards=str(tmp_path),
        seq_len=48,
        batch_size=3,
        seed=5,
        mixing={"A/domain": 2.0, "B/domain": 1.0},
        shuffle_buffer=7,
        num_workers=1,
        packing="bestfit",
        bestfit_buffer=9,
        on_corrupt="skip",
        verify=False,
        log_every=200,
    )
    assert loader_settings(cfg, seed=11).seed == 11 and loader_settings(cfg).seed == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1
    with pytest.raises(ValueError, match="train.loader.on_corrupt"):
        LoaderSettings(on_corrupt="ignore")
    # What the worker processes get: the same values, in one read plan.
    write_prepared(tmp_path, n_shards=2)
    loader = build_loader(s, rank=1, world_size=2)
    plan = loader.plan
    assert (plan.n_global, plan.seed, plan.shuffle_buffer, plan.on_corrupt) == (2, 5, 7, "skip")
    assert plan.checks is None and plan.weights == pytest.approx({"A/domain": 2 / 3, "B/domain": 1 / 3})
    assert loader.packer.kind == "bestfit"


def test_pipe_and_brace_urls(tmp_path):
    info = write_prepared(tmp_path, n_shards=4)
    spec = f"pipe:cat {tmp_path}/shards/shard-{{000000..000003}}.tar"
    urls, manifest = resolve_shards(spec)
    assert len(urls) == 4 and all(u.startswith("pipe:cat ") for u in urls) and manifest is None
    loader = PackedLoader(
        urls, LoaderSettings(seq_len=32, batch_size=2, shuffle_buffer=8, chunk_docs=8, log_every=0)
    )
    assert sorted(one_epoch(loader)) == sorted(info["docs"])
    # A local brace spec finds the manifest one folder up.
    urls, manifest = resolve_shards(f"{tmp_path}/shards/shard-{{000000..000003}}.tar")
    assert len(urls) == 4 and manifest is not None


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize(
    "num_workers,packing,mixing",
    [
        (0, "greedy", None),
        (0, "bestfit", {"A/domain": 0.5, "B/domain": 0.3, "all/mixed": 0.2}),
        (2, "greedy", None),
        (2, "bestfit", {"A/domain": 0.5, "B/domain": 0.3, "all/mixed": 0.2}),
    ],
)
def test_resume_gives_exactly_the_next_batches(tmp_path, num_workers, packing, mixing):
    write_prepared(tmp_path, n_shards=5)
    kw = dict(num_workers=num_workers, packing=packing, mixing=mixing, bestfit_buffer=6)
    N = 37  # ~2 epochs in 2N batches: the resumes cross chunk, shard and epoch boundaries
    cuts = (N - 2, N)  # two interruption points, so that some resume is due from worker 1

    full = make_loader(tmp_path, **kw)
    it = iter(full)
    expected = [next(it) for _ in range(2 * N)]
    full.close()
    assert max(full.stats()["epochs"].values()) >= 1

    first = make_loader(tmp_path, **kw)
    it = iter(first)
    head, states = [], {}
    for n in range(1, N + 2):  # keeps going after the last state was taken: must not change it
        head.append(next(it))
        if n in cuts:
            states[n] = json.loads(json.dumps(first.state_dict()))  # goes into trainer_state.json
    first.close()
    if num_workers:
        assert {states[n]["rotation"] for n in cuts} == {0, 1}

    for n in cuts:
        resumed = make_loader(tmp_path, **kw)
        resumed.load_state_dict(states[n])
        it = iter(resumed)
        tail = [next(it) for _ in range(2 * N - n)]
        resumed.close()
        for i, (a, b) in enumerate(zip(expected, head[:n] + tail, strict=True)):
            for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(a[k], b[k]), f"resumed after {n}: batch {i}: {k} differs"
            assert a["stream_tokens"] == b["stream_tokens"] and a["max_seqlen"] == b["max_seqlen"]
        assert resumed.stats()["batches"] == 2 * N


def test_iterating_again_continues_where_it_stopped(tmp_path):
    write_prepared(tmp_path, n_shards=3)
    a = make_loader(tmp_path)
    it = iter(a)
    expected = [next(it) for _ in range(10)]
    b = make_loader(tmp_path)
    it = iter(b)
    got = [next(it) for _ in range(4)]
    it = iter(b)  # a new iterator picks up after batch 4
    got += [next(it) for _ in range(6)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(expected, got))


def test_resume_on_another_world_size_restarts_the_epoch_with_a_warning(tmp_path, caplog):
    info = write_prepared(tmp_path, n_shards=5)
    states = []
    for rank in range(2):
        loader = make_loader(tmp_path, rank=rank, world_size=2, num_workers=1)
        it = iter(loader)
        for _ in range(40):  # past the end of epoch 0 on this rank
            next(it)
        loader.close()
        states.append(json.loads(json.dumps(loader.state_dict())))
    saved_epoch = min(min(r["epochs"].values()) for s in states for r in s["workers"])
    assert saved_epoch >= 1

    single = make_loader(tmp_path, rank=0, world_size=1, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="cprec.stream.loader"):
        single.load_state_dict(states)
    msg = caplog.text
    assert "world_size: 2 -> 1" in msg
    assert "epoch granularity" in msg
    # Counters carry over; documents restart at the first shard of the oldest saved epoch.
    assert single.stats()["batches"] == 40
    keys = one_epoch(single, epoch=saved_epoch)
    assert sorted(keys) == sorted(info["docs"])
    assert next(single.iter_documents()).epoch == saved_epoch + 1


def test_state_of_the_same_layout_on_another_rank_is_refused_exactly(tmp_path, caplog):
    write_prepared(tmp_path, n_shards=4)
    a = make_loader(tmp_path, rank=0, world_size=2)
    it = iter(a)
    next(it)
    b = make_loader(tmp_path, rank=1, world_size=2)
    with caplog.at_level(logging.WARNING, logger="cprec.stream.loader"):
        b.load_state_dict(a.state_dict())
    assert "rank: 0 -> 1" in caplog.text


# ---------------------------------------------------------------------------- mixing
def test_mixing_weights_are_realised_and_logged(tmp_path, caplog):
    write_prepared(tmp_path, n_shards=4, counts={"A/domain": 60, "B/domain": 40, "all/mixed": 80})
    weights = {"A/domain": 0.2, "B/domain": 0.2, "all/mixed": 0.6}  # far from the natural mix
    loader = make_loader(tmp_path, mixing=weights, num_workers=2, seq_len=64, batch_size=4, log_every=20)
    assert loader.targets() == pytest.approx(weights)
    it = iter(loader)
    with caplog.at_level(logging.INFO, logger="cprec.stream.loader"):
        for _ in range(60):
            next(it)
    loader.close()
    assert re.search(r"after 60 batches: mix A/domain 0\.\d+ \(target 0\.200\)", caplog.text)
    mix = loader.realised_mix()
    for s, w in weights.items():
        assert mix[s]["target"] == pytest.approx(w)
        assert abs(mix[s]["share"] - w) < 0.02, mix


def test_zero_weight_excludes_a_stream_and_natural_follows_tokens(tmp_path):
    info = write_prepared(tmp_path, n_shards=3)
    loader = make_loader(tmp_path, mixing={"A/domain": 1.0, "all/mixed": 0.0})
    it = iter(loader)
    batches = [next(it) for _ in range(20)]
    assert all(set(b["stream_tokens"]) == {"A/domain"} for b in batches)

    natural = make_loader(tmp_path, seq_len=16)
    keys = one_epoch(natural)
    tokens = Counter()
    for k in keys:
        tokens[info["streams"][k]] += len(info["docs"][k])
    total = sum(tokens.values())
    for s, t in natural.targets().items():
        assert tokens[s] / total == pytest.approx(t)


def test_new_weights_on_resume_keep_positions_and_apply(tmp_path, caplog):
    write_prepared(tmp_path, n_shards=3, counts={"A/domain": 60, "B/domain": 60})
    old = make_loader(tmp_path, mixing={"A/domain": 0.5, "B/domain": 0.5})
    it = iter(old)
    for _ in range(10):
        next(it)
    state = old.state_dict()
    new = make_loader(tmp_path, mixing={"A/domain": 0.9, "B/domain": 0.1})
    with caplog.at_level(logging.WARNING, logger="cprec.stream.loader"):
        new.load_state_dict(state)
    assert "mixing weights changed" in caplog.text and "epoch granularity" not in caplog.text
    it = iter(new)
    before = dict(new._stream_tokens)
    for _ in range(40):
        next(it)
    added = {s: new._stream_tokens[s] - before.get(s, 0) for s in new._stream_tokens}
    assert added["A/domain"] / sum(added.values()) == pytest.approx(0.9, abs=0.03)


def test_unknown_mixing_stream_is_a_clear_error(tmp_path):
    write_prepared(tmp_path, n_shards=2)
    with pytest.raises(ValueError, match=r"train\.loader\.mixing\.C/domain.*A/domain"):
        make_loader(tmp_path, mixing={"C/domain": 1.0})
    with pytest.raises(ValueError, match=r"every weight is 0"):
        make_loader(tmp_path, mixing={"A/domain": 0.0})
    urls, _ = resolve_shards(f"{tmp_path}/shards/shard-{{000000..000001}}.tar")
    with pytest.raises(ValueError, match="manifest"):
        PackedLoader(urls, LoaderSettings(mixing={"A/domain": 1.0}))


# ---------------------------------------------------------------------------- corrupt shards
def _fails_naming(loader: PackedLoader, match: str) -> None:
    """Reading ``loader`` raises a ShardError (from a worker process: one naming it) matching ``match``."""
    with pytest.raises(Exception, match=match) as exc:
        it = iter(loader)
        for _ in range(200):
            next(it)
    assert isinstance(exc.value, ShardError) or "ShardError" in str(exc.value)
    loader.close()


def _damage(root: Path) -> tuple[str, str]:
    truncated = root / "shards" / "shard-000001.tar"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    missing = root / "shards" / "shard-000002.tar"
    os.remove(missing)
    return str(truncated), str(missing)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_fails_naming_it(tmp_path, num_workers):
    write_prepared(tmp_path, n_shards=4)
    _damage(tmp_path)
    _fails_naming(make_loader(tmp_path, num_workers=num_workers), r"shard-00000[12]\.tar")


def test_corrupt_and_missing_shards_are_skipped_with_a_warning_and_a_count(tmp_path, caplog):
    info = write_prepared(tmp_path, n_shards=4)
    truncated, missing = _damage(tmp_path)
    loader = make_loader(tmp_path, on_corrupt="skip")
    with caplog.at_level(logging.WARNING):
        keys = one_epoch(loader)
    assert truncated in caplog.text and missing in caplog.text
    assert loader.stats()["skipped_shards"] == 2
    # Shards with a sha256 in the manifest are all or nothing: the two intact ones arrive, once.
    manifest = info["manifest"]
    intact = manifest["shards"][0]["samples"] + manifest["shards"][3]["samples"]
    assert len(keys) == len(set(keys)) == intact
    # Unverified (train.loader.verify=false), the readable front part of the truncated one arrives too.
    keys = one_epoch(make_loader(tmp_path, on_corrupt="skip", verify=False))
    assert len(keys) == len(set(keys)) and intact < len(keys) < intact + manifest["shards"][1]["samples"]

    # Through pipe: and worker processes the count still reaches the loader.
    spec = f"pipe:cat {tmp_path}/shards/shard-{{000000..000003}}.tar"
    urls, _ = resolve_shards(spec)
    settings = LoaderSettings(num_workers=2, on_corrupt="skip", seq_len=32, batch_size=2, log_every=0)
    loader = PackedLoader(urls, settings)
    it = iter(loader)
    for _ in range(30):
        next(it)
    loader.close()
    assert loader.stats()["skipped_shards"] >= 2


def _flip_ids(shard: Path, n: int = 3) -> list[str]:
    """Overwrite 8 payload bytes of the first ``n`` ids.npy members (ids become -3968); their keys."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".ids.npy")][:n]
    data = bytearray(shard.read_bytes())
    for m in members:
        at = m.offset_data + 128 + 4  # past the .npy header and BOS
        data[at : at + 8] = b"\x80\xf0\xff\xff" * 2
    shard.write_bytes(bytes(data))
    return [m.name.split(".")[0] for m in members]


def test_sha256_is_checked_while_streaming(tmp_path):
    info = write_prepared(tmp_path, n_shards=2)
    path, sha = tmp_path / info["manifest"]["shards"][0]["path"], info["manifest"]["shards"][0]["sha256"]
    assert len(list(iter_tar_samples(str(path), sha))) == info["manifest"]["shards"][0]["samples"]
    _flip_ids(path)
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sha256 .* does not match"):
        list(iter_tar_samples(str(path), sha))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_byte_flipped_ids_fail_naming_the_shard(tmp_path, num_workers):
    write_prepared(tmp_path, n_shards=4)
    _flip_ids(tmp_path / "shards" / "shard-000002.tar")
    _fails_naming(make_loader(tmp_path, num_workers=num_workers), r"shard-000002\.tar: sha256")


def test_byte_flipped_shard_is_skipped_whole_and_counted(tmp_path):
    info = write_prepared(tmp_path, n_shards=4)
    _flip_ids(tmp_path / "shards" / "shard-000002.tar")
    loader = make_loader(tmp_path, on_corrupt="skip")
    got = []
    for d in loader.iter_documents():
        if d.epoch > 0:
            break
        got.append(d)
    assert loader.stats()["skipped_shards"] == 1 and loader.stats()["skipped_samples"] == 0
    samples = [s["samples"] for s in info["manifest"]["shards"]]
    assert len(got) == sum(samples) - samples[2]  # nothing of the corrupt shard, all of the others
    assert all(0 <= int(d.tokens.min()) and int(d.tokens.max()) < 1000 for d in got)


def test_out_of_vocabulary_ids_name_shard_and_sample(tmp_path):
    """Without a sha256 in the manifest the vocabulary check still catches the ids, per sample."""
    info = write_prepared(tmp_path, n_shards=4)
    manifest = info["manifest"]
    for s in manifest["shards"]:
        s["sha256"] = ""
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    bad = _flip_ids(tmp_path / "shards" / "shard-000001.tar", n=2)
    with pytest.raises(
        ShardError, match=rf"shard-000001\.tar sample ({'|'.join(bad)}): 2 token id\(s\) outside"
    ):
        it = iter(make_loader(tmp_path))
        for _ in range(200):
            next(it)
    loader = make_loader(tmp_path, on_corrupt="skip")
    keys = one_epoch(loader)
    assert loader.stats()["skipped_samples"] == 2 and loader.stats()["skipped_shards"] == 0
    assert sorted(keys) == sorted(set(info["docs"]) - set(bad))  # every good document of the shard kept


def test_skip_counts_survive_a_resume_on_any_layout(tmp_path):
    """The counts the trainer reports run from the start of the run, across resumes."""
    write_prepared(tmp_path, n_shards=4)
    _damage(tmp_path)
    states, skipped = [], 0
    for rank in range(2):
        loader = make_loader(tmp_path, rank=rank, world_size=2, on_corrupt="skip")
        one_epoch(loader)
        skipped += loader.stats()["skipped_shards"]
        states.append(json.loads(json.dumps(loader.state_dict())))
    assert skipped >= 2  # each damaged shard at least once (epoch 1 may have begun)
    same = make_loader(tmp_path, rank=1, world_size=2, on_corrupt="skip")
    same.load_state_dict(states[1])
    assert same.stats()["skipped_shards"] == states[1]["workers"][0]["skipped_shards"]
    # Another world size: rank 0 takes every saved rank's count, the others none.
    ranks = [make_loader(tmp_path, rank=r, world_size=3, on_corrupt="skip") for r in range(3)]
    for loader in ranks:
        loader.load_state_dict(states)
    assert [loader.stats()["skipped_shards"] for loader in ranks] == [skipped, 0, 0]
    roundtrip = make_loader(tmp_path, rank=0, world_size=3, on_corrupt="skip")
    roundtrip.load_state_dict(json.loads(json.dumps(ranks[0].state_dict())))
    assert roundtrip.stats()["skipped_shards"] == skipped


def test_all_shards_missing_is_an_error_not_a_hang(tmp_path):
    write_prepared(tmp_path, n_shards=2)
    for p in (tmp_path / "shards").iterdir():
        os.remove(p)
    loader = make_loader(tmp_path, on_corrupt="skip")
    with pytest.raises(RuntimeError, match="ran out of documents"):
        next(iter(loader))


def test_prepared_folder_manifest_errors(tmp_path):
    """A folder without a manifest, of another format version, or listing no shard is refused."""
    with pytest.raises(FileNotFoundError, match="run `cprec prepare` first"):
        resolve_shards(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format_version": 99, "shards": []}')
    with pytest.raises(ValueError, match="format_version"):
        resolve_shards(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "shards": []}')
    with pytest.raises(ValueError, match="lists no shards"):
        resolve_shards(str(tmp_path))


def test_the_manifest_of_a_shard_spec_is_found_in_one_place(tmp_path):
    """The loader and the trainer's tokenizer check read the same manifest for any shard spec."""
    from cprec.train.trainer import read_manifest as trainer_manifest

    write_prepared(tmp_path / "other", n_shards=2)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "manifest.json").write_text('{"format_version": 1, "tokenizer": {"hash": "x"}}')
    brace = f"{tmp_path}/other/shards/shard-{{000000..000001}}.tar"
    assert manifest_folder(str(tmp_path / "other")) == tmp_path / "other"
    assert manifest_folder(str(tmp_path / "other" / "manifest.json")) == tmp_path / "other"
    assert manifest_folder(brace) == tmp_path / "other"
    assert manifest_folder(f"pipe:cat {brace}") is None
    _, manifest = resolve_shards(brace)

    def cfg(shards: str):
        return load_config(None, [f"data.output_dir={tmp_path / 'local'}", f"train.loader.shards={shards}"])

    # Shards of another prepared folder: their own manifest, not data.output_dir's.
    assert trainer_manifest(cfg(brace)) == (tmp_path / "other", manifest)
    # Remote shards (no manifest beside them): the local prepared folder's.
    assert trainer_manifest(cfg(f"pipe:cat {brace}"))[0] == tmp_path / "local"
