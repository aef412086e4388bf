"""Outputs appear complete or not at all: each is written under a hidden temporary name next to
its final path and renamed into place when finished."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def temporary_sibling(final: str | os.PathLike) -> Path:
    """A fresh temporary path next to ``final`` (same filesystem, so the rename is atomic).
    Leftovers of earlier runs that were killed are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        _remove(stale)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished ``tmp`` to ``final``, replacing what was there."""
    final = Path(final)
    if final.exists() or final.is_symlink():
        _remove(final)
    os.replace(tmp, final)


def discard(tmp: str | os.PathLike) -> None:
    """Remove a temporary output that will not be published."""
    if os.path.lexists(tmp):
        _remove(Path(tmp))


@contextlib.contextmanager
def written(final: str | os.PathLike, directory: bool = False):
    """Yield a temporary path to write ``final`` under (an empty directory with ``directory``);
    it becomes ``final`` if the block finishes, and is removed if it raises."""
    tmp = temporary_sibling(final)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final)
    finally:
        discard(tmp)


def write_parquet(frame, path: str | os.PathLike) -> None:
    """Write a pandas frame to ``path`` atomically, without its index."""
    with written(path) as tmp:
        frame.to_parquet(tmp, index=False)
