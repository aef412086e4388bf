"""Snakemake's between-workflow output cache: where it lives, and which entry a result came from.

With ``--cache`` (profiles/default turns it on) Snakemake moves each output of a rule into the
cache folder under a hash of everything that made it, and leaves a symbolic link in ``results/``;
a later run, in this checkout or another one that uses the same folder, links the entry instead
of running the job.
"""

from __future__ import annotations

import os
from pathlib import Path

VARIABLE = "SNAKEMAKE_OUTPUT_CACHE"
DEFAULT = ".cache/snakemake"  # in the working directory


def default_location() -> Path:
    """``.cache/snakemake`` in the working directory."""
    return Path(DEFAULT).resolve()


def create() -> Path:
    """The cache folder ($SNAKEMAKE_OUTPUT_CACHE), created if missing: Snakemake stores entries
    only in a folder that exists."""
    folder = Path(os.environ.get(VARIABLE) or default_location())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_entry(path: str | Path) -> Path | None:
    """The cache entry that ``path`` (a result file, or a file inside a result folder) links to,
    or None when it does not come from the cache."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.is_symlink():
            return candidate.resolve()
    return None


def provenance(path: str | Path) -> str:
    """`` (cache entry X)`` for a result that comes from the cache; empty otherwise. For error
    messages: a corrupted entry must be deleted before a rerun recomputes it."""
    entry = cache_entry(path)
    return (
        f" (from the output cache entry {entry}: delete it and rerun to recompute)" if entry else ""
    )
