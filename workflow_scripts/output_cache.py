"""Snakemake's between-workflow output cache: where it lives, and which entry a result came from.

With ``--cache`` (profiles/default turns it on) Snakemake moves each output of a rule into the
cache folder under a hash of everything that made it, and leaves a symbolic link in ``results/``;
a later run, in this checkout or another one that uses the same folder, links the entry instead
of running the job.
"""

from __future__ import annotations

import errno
import os
import shutil
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


TIMESTAMP = ".snakemake_timestamp"  # what Snakemake adds to a folder output


def remove_dangling_links(root: str | Path = "results") -> list[Path]:
    """Remove the results that link to a cache entry that was deleted, so that a rerun computes
    them again (Snakemake would fail on a dangling link, or take a folder output whose files
    link nowhere as done). A file result is its link; a folder result taken from the cache is a
    folder of links (with Snakemake's timestamp file) and goes as a whole. Returns what went."""
    removed = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        dangling = [
            here / name
            for name in (*subfolders, *files)
            if (here / name).is_symlink() and not (here / name).exists()
        ]
        if (here / TIMESTAMP).exists():  # a folder output: its files are not walked further
            subfolders.clear()
            if dangling:
                shutil.rmtree(here)
                removed.append(here)
            continue
        for link in dangling:
            link.unlink()
            removed.append(link)
    return removed


class _EntryMoves:
    """Stands in for ``shutil`` in Snakemake's local output cache (9.x): its store moves a
    finished entry from a temporary folder to its place, and a folder moved onto one that
    exists lands *inside* it. When two runs sharing a cache store the same entry at once, the
    second would nest a copy in the first's. Here the second keeps the first's (same key, so the
    same content) and drops its own; every other call is shutil's."""

    def __getattr__(self, name):
        return getattr(shutil, name)

    @staticmethod
    def move(source, destination, copy_function=shutil.copy2):
        source, destination = Path(source), Path(destination)
        if not (source.is_dir() and source.name == destination.name):
            return shutil.move(source, destination, copy_function=copy_function)
        try:  # an entry's last move, within the cache folder: one atomic rename
            os.rename(source, destination)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not destination.is_dir():
                raise
            shutil.rmtree(source)  # another run stored this entry first
        return str(destination)


def entry_hash(path: str | Path) -> str | None:
    """The provenance hash a result's cache entry is named by (the entry is ``<hash><ext>``), or
    None when ``path`` does not come from the cache. A folder taken from the cache may be a
    folder of links: its files name the entry."""
    path = Path(path)
    entry = cache_entry(path)
    if entry is None and path.is_dir() and not path.is_symlink():
        link = next((p for p in path.iterdir() if p.is_symlink()), None)
        entry = None if link is None else link.resolve().parent
    if entry is None or len(entry.name) < 64:
        return None
    name = entry.name[:64]
    return name if all(c in "0123456789abcdef" for c in name) else None


def _cached_inputs_as_upstream(original):
    """Wraps Snakemake's provenance hash of a job. Snakemake hashes an input made by another job
    through that job's own provenance hash, but a cluster job's Snakemake knows only its own job:
    it would hash such an input by its content (and fail on a folder), so its cache key would
    not be the one the submitting Snakemake computes. Here an input that no job of the DAG makes
    but that links to a cache entry counts as made by an upstream job whose hash is the entry's
    name: the key a cluster job computes is then the submitting host's."""

    class Upstream(str):
        """Stands in for the job that made a cached input."""

    async def provenance_hash(self, job):
        if job in self._hashes:  # an upstream stand-in, or a job already hashed
            return self._hashes[job]
        dependencies = job.dag.dependencies[job]
        made_upstream = set().union(*dependencies.values()) if dependencies else set()
        added = []
        for file in job.input:
            digest = None if file in made_upstream else entry_hash(file)
            if digest is not None:
                upstream = Upstream(digest)
                self._hashes[upstream] = digest
                dependencies.setdefault(upstream, set()).add(file)
                added.append(upstream)
        try:
            return await original(self, job)
        finally:
            for upstream in added:
                dependencies.pop(upstream, None)

    provenance_hash.wrapped = original
    return provenance_hash


def guard_cluster_jobs() -> None:
    """Give a cluster job's Snakemake (``--mode remote``) the cache keys of the submitting one
    (see ``_cached_inputs_as_upstream``); the submitting Snakemake knows every job, and needs
    nothing."""
    from snakemake.caching.hash import ProvenanceHashMap

    method = ProvenanceHashMap._get_provenance_hash
    if not hasattr(method, "wrapped"):
        ProvenanceHashMap._get_provenance_hash = _cached_inputs_as_upstream(method)


def guard_concurrent_stores() -> None:
    """Make Snakemake's store of a folder entry safe against a concurrent store of the same."""
    from snakemake.caching import local

    if getattr(local, "shutil", None) is shutil:
        local.shutil = _EntryMoves()
