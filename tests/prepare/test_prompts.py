"""Prompt templates, item truncation to a token budget, and sequence windows."""

from __future__ import annotations

import random

import pytest

from cprec.config import PromptConfig
from cprec.prepare.prompts import PromptRenderer, plan_windows, truncate_to_budget
from cprec.prepare.schema import Item

HEAT = Item("m1", "movies", "Heat (1995)", {"year": "1995", "genres": "Action, Crime"})


def test_item_and_sequence_templates():
    r = PromptRenderer(PromptConfig(), {"movies": "Movies"})
    assert r.item(HEAT) == "Heat (1995)"
    assert r.item(HEAT, mixed=True) == "[Movies] Heat (1995)"
    assert r.sequence("domain", "movies", ["a", "b"]) == "A user's Movies history: a; b"
    assert r.sequence("mixed", "all", ["[X] a"]) == "A user's history across all domains: [X] a"


def test_custom_templates_with_fields():
    cfg = PromptConfig(
        item="{title} | {fields}",
        item_in_mixed="<{domain}> {title} ({genres})",
        domain_seq="{domain}:\n{items}\nend",
        item_sep=" / ",
    )
    r = PromptRenderer(cfg)
    assert r.item(HEAT) == "Heat (1995) | year: 1995, genres: Action, Crime"
    assert r.item(HEAT, mixed=True) == "<movies> Heat (1995) (Action, Crime)"
    assert r.frame("domain", "movies") == ("movies:\n", "\nend")
    assert r.sequence("domain", "movies", ["x {items} y", "z"]) == "movies:\nx {items} y / z\nend"


def test_bad_templates_fail_clearly():
    with pytest.raises(ValueError, match=r"data\.prompt\.item.*unknown template field \{rating\}"):
        PromptRenderer(PromptConfig(item="{title} {rating}")).item(HEAT)
    with pytest.raises(ValueError, match=r"data\.prompt\.item_in_mixed.*bad template"):
        PromptRenderer(PromptConfig(item_in_mixed="{title"))
    with pytest.raises(ValueError, match=r"data\.prompt\.domain_seq"):
        PromptRenderer(PromptConfig(domain_seq="{user} {items}"))


def _char_codec():
    """A toy tokenizer: one token per character (decode = join)."""
    return (lambda s: list(s.encode("utf-8"))), (lambda ids: bytes(ids).decode("utf-8", errors="replace"))


def test_truncate_to_budget():
    enc, dec = _char_codec()
    assert truncate_to_budget("short", enc, dec, 10) == ("short", 5)
    text, n = truncate_to_budget("a long title here", enc, dec, 7)
    assert text == "a long" and n == 6  # trailing space stripped
    # a cut inside a multi-byte character moves back to a clean prefix
    text, n = truncate_to_budget("ab" + "é" * 5, enc, dec, 5)
    assert text == "abé" and n == 4


def test_windows_cover_every_item_and_fit():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(1, 12) for _ in range(rng.randint(1, 60))]
        overhead, sep, max_tokens = rng.randint(3, 8), rng.randint(0, 2), rng.randint(20, 60)
        overlap = rng.randint(0, 3)
        wins = plan_windows(counts, overhead, sep, max_tokens, overlap)
        covered = set()
        for k, (a, b) in enumerate(wins):
            assert a < b
            covered.update(range(a, b))
            cost = overhead + sum(counts[a:b]) + sep * (b - a - 1)
            assert cost <= max_tokens or b - a == 1
            if k:
                prev_a, prev_b = wins[k - 1]
                assert a > prev_a and a == max(prev_b - overlap, prev_a + 1)
        assert covered == set(range(len(counts)))
        assert wins[-1][1] == len(counts)


def test_windows_single_window_when_it_fits():
    assert plan_windows([3, 3, 3], overhead=4, sep=1, max_tokens=15) == [(0, 3)]
    assert plan_windows([3, 3, 3], overhead=4, sep=1, max_tokens=14) == [(0, 2), (2, 3)]
    assert plan_windows([3, 3, 3, 3], overhead=4, sep=1, max_tokens=11, overlap=1) == [(0, 2), (1, 3), (2, 4)]
    assert plan_windows([50, 2], overhead=4, sep=1, max_tokens=20) == [(0, 1), (1, 2)]
