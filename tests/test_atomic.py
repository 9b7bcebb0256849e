"""`cprec.atomic`: a file or folder appears whole under its name, or not at all."""

from __future__ import annotations

import pytest

from cprec import atomic


def test_a_folder_replaces_the_old_one_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # readers see the old folder until the swap
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no .tmp-/.old- leftovers


def test_an_error_leaves_the_old_content_and_no_leftover(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="mid-way"), atomic.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed mid-way")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_json_and_text_files(tmp_path):
    f = atomic.write_json(tmp_path / "a" / "x.json", {"b": 1, "a": [2]}, sort_keys=True)
    assert f.read_text(encoding="utf-8") == '{"a": [2], "b": 1}'
    atomic.write_text(f, "é\n")
    assert f.read_text(encoding="utf-8") == "é\n" and len(list(f.parent.iterdir())) == 1
