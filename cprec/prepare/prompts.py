"""The unified prompt template: one item, a domain-specific sequence, an all-domain mixed sequence.

Templates are Python format strings (``PromptConfig``). An item renders from ``{title}``,
``{domain}`` (display name), ``{item}`` (id), ``{fields}`` (the other text fields as
``name: value`` pairs) and each text field by name (e.g. ``{year}``, ``{genres}``). A sequence
renders from ``{domain}`` and ``{items}`` (rendered items joined by ``item_sep``).

Pre-training and evaluation both render through ``PromptRenderer``, so a user prompt at eval time
reads exactly like the pre-training text. Item text is cut to ``item_token_budget`` tokens per item
(``truncate_to_budget``); a behaviour sequence longer than ``max_doc_tokens`` is split into
windows of whole items (``plan_windows``), each rendered with the full template.
"""

from __future__ import annotations

import string
from collections.abc import Callable

from cprec.config import PromptConfig
from cprec.prepare.schema import Item

_SENTINEL = "\x00ITEMS\x00"


class _Values(dict):
    """format_map mapping that names the template and the available fields on a miss."""

    def __init__(self, values: dict, template_name: str):
        super().__init__(values)
        self.template_name = template_name

    def __missing__(self, key):
        raise ValueError(
            f"config field '{self.template_name}': unknown template field {{{key}}}; "
            f"available: {', '.join('{' + k + '}' for k in self)}"
        )


def _format(template: str, values: dict, name: str) -> str:
    try:
        return template.format_map(_Values(values, name))
    except (IndexError, KeyError, AttributeError) as e:
        raise ValueError(f"config field '{name}': bad template {template!r} ({e!r})") from None


class PromptRenderer:
    """Renders items and behaviour sequences with the configured templates."""

    def __init__(self, cfg: PromptConfig, domain_names: dict[str, str] | None = None):
        self.cfg = cfg
        self.domain_names = dict(domain_names or {})
        # Fail at start-up on malformed templates; item fields depend on the data, so an unknown
        # item field is reported when the first item renders (prepare renders all items early).
        for name in ("item", "item_in_mixed"):
            try:
                list(string.Formatter().parse(getattr(cfg, name)))
            except ValueError as e:
                raise ValueError(f"config field 'data.prompt.{name}': bad template ({e})") from None
        self.frame("domain", "domain")
        self.frame("mixed", "all")

    def domain_label(self, domain: str) -> str:
        """How a domain is named inside prompts (``data.prompt.domain_names``, default the id)."""
        return self.domain_names.get(domain, domain)

    def item(self, item: Item, mixed: bool = False) -> str:
        """One item's text (untruncated); ``mixed`` uses the domain-tagged template."""
        other = ", ".join(f"{k}: {v}" for k, v in item.fields.items() if v)
        values = {
            **item.fields,
            "title": item.title,
            "domain": self.domain_label(item.domain),
            "item": item.item,
            "fields": other,
        }
        if mixed:
            return _format(self.cfg.item_in_mixed, values, "data.prompt.item_in_mixed")
        return _format(self.cfg.item, values, "data.prompt.item")

    def frame(self, kind: str, domain: str) -> tuple[str, str]:
        """(text before the items, text after them) of a sequence template."""
        if kind == "domain":
            template, name = self.cfg.domain_seq, "data.prompt.domain_seq"
        elif kind == "mixed":
            template, name = self.cfg.mixed_seq, "data.prompt.mixed_seq"
        else:
            raise ValueError(f"unknown sequence kind {kind!r}")
        text = _format(template, {"domain": self.domain_label(domain), "items": _SENTINEL}, name)
        prefix, _, suffix = text.partition(_SENTINEL)
        return prefix, suffix

    def sequence(self, kind: str, domain: str, item_texts: list[str]) -> str:
        """A whole behaviour sequence from already rendered (and truncated) item texts."""
        prefix, suffix = self.frame(kind, domain)
        return prefix + self.cfg.item_sep.join(item_texts) + suffix


def truncate_to_budget(
    text: str,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    budget: int,
) -> tuple[str, int]:
    """(text cut to at most ``budget`` tokens, its token count).

    Cuts at token level and decodes back; a cut inside a multi-byte character (byte fallback)
    or one that re-tokenizes longer is moved one token earlier until the decoded text is a clean
    prefix of the original that encodes within the budget.
    """
    ids = encode(text)
    if len(ids) <= budget:
        return text, len(ids)
    # First choice: a clean prefix of the original text; a normalizing tokenizer (lower-casing,
    # say) never gives one, and then the longest decoded cut that fits is taken.
    for need_prefix in (True, False):
        for cut in range(budget, 0, -1):
            cand = decode(ids[:cut]).rstrip()
            if not cand or (need_prefix and not text.startswith(cand)):
                continue
            n = len(encode(cand))
            if n <= budget:
                return cand, n
    return "", 0


def plan_windows(
    counts: list[int], overhead: int, sep: int, max_tokens: int, overlap: int = 0
) -> list[tuple[int, int]]:
    """Split items with token ``counts`` into ``[start, end)`` windows of at most ``max_tokens``.

    ``overhead`` is the template + BOS/EOS cost of one document, ``sep`` the cost of one item
    separator. Windows hold whole items, cover every item, and the next window repeats the last
    ``overlap`` items of the previous one (always moving forward by at least one item). A single
    item that does not fit on its own still gets a window of its own.
    """
    n = len(counts)
    windows: list[tuple[int, int]] = []
    start = 0
    while start < n:
        end, total = start, overhead
        while end < n and total + counts[end] + (sep if end > start else 0) <= max_tokens:
            total += counts[end] + (sep if end > start else 0)
            end += 1
        end = max(end, start + 1)
        windows.append((start, end))
        if end >= n:
            break
        start = max(end - overlap, start + 1)
    return windows
