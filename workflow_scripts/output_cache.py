"""The output cache: every job's results stored once, under a key of what made them, and shared
by every run that uses the same folder (local runs, cluster jobs, other checkouts).

A job's key is a sha256 of its rule, its params (every config value and wildcard it uses, and
the key of the code it runs: ``stage_code``) and a digest of each input: the key and output of
the cache entry an input links to, else the input's content. It is computed inside the job, from
the job's own inputs, by the job itself, the same way wherever the job runs: a SLURM job and a
local run of the same job compute the same key, with no knowledge of the DAG and nothing of
Snakemake's internals.

An entry is the folder ``<cache>/<key>/``: one item per named output (``out.parquet``,
``png.png``, ``out.zarr``, ...) and ``entry.json`` (the rule, the outputs, the sha256 of every
file). It is assembled under a temporary name and renamed into place, so it is complete or
absent; two runs storing the same key at once keep the first. Files are stored read-only. A
job's outputs in ``results/`` are symbolic links to the entry's items: a job whose key has an
entry links it instead of running (its log says so). A result whose entry was deleted is a
dangling link, which Snakemake takes for an existing result: ``python -m
workflow_scripts.output_cache prune`` removes those links, and the next run makes them again
(``remove ENTRY`` deletes an entry and prunes at once; a job that would read a dangling link
stops and says so).

The folder is ``$RESIDUAL_STREAMS_CACHE``, else ``.cache/residual-streams`` in the working
directory; ``RESIDUAL_STREAMS_CACHE=off`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from workflow_scripts.stage import InputError

VARIABLE = "RESIDUAL_STREAMS_CACHE"
DEFAULT = ".cache/residual-streams"  # in the working directory
ENTRY = "entry.json"
KEY = re.compile(r"[0-9a-f]{64}")
TIMESTAMP = ".snakemake_timestamp"  # what Snakemake adds to a folder output
HIT = "taken from the output cache entry"  # what a job's log says, then the entry
STORED = "stored in the output cache entry"
# params that say where a job runs, not what it computes: a model split over several GPUs gives
# the stream of the whole one, so moving it to other devices reuses its entries
NOT_KEYED = ("placement",)


class CacheError(InputError):
    """A cache folder or entry that cannot be trusted: open to other users, or corrupted."""


def folder() -> Path | None:
    """The cache folder ($RESIDUAL_STREAMS_CACHE, else .cache/residual-streams here), or None
    where the variable says ``off``."""
    value = os.environ.get(VARIABLE) or DEFAULT
    return None if value == "off" else Path(value).resolve()


def checked_folder(cache: Path) -> Path:
    """The cache folder, created private to this user where it is missing; refused where every
    user may write into it (anyone could then put an entry of theirs under a key). A cache shared
    by a group is a folder of that group, writable by it and by no one else (see the docs)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache.mkdir(mode=0o700)
    except FileExistsError:
        pass  # there already, or made by a job started beside this one
    else:
        os.chmod(cache, 0o700)  # whatever the umask
    if os.stat(cache).st_mode & stat.S_IWOTH:
        raise CacheError(
            f"the output cache folder {cache} is writable by every user, who could replace its "
            f"entries: `chmod o-w {cache}` (a cache shared by a group: `chgrp GROUP {cache} && "
            f"chmod 3770 {cache}`), or set {VARIABLE} to a folder of your own"
        )
    return cache


def complete(entry: Path, items: Mapping | None = None) -> bool:
    """Whether every file an entry recorded when stored is there (a cheap stat of each)."""
    if not (entry / ENTRY).is_file():
        return False
    if items is None:
        items = json.loads((entry / ENTRY).read_text())["items"]
    return all((entry / item / name).exists() for item, files in items.items() for name in files)


def verify(entry: Path, items: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Check an entry's files against what it recorded when stored: every file there, none
    writable by other users, and each file item's sha256 (the files of a folder item are
    checked as they are read: a model folder's manifest, an activation shard's crc32c). A
    CacheError names the entry otherwise."""
    if items is None:
        items = json.loads((entry / ENTRY).read_text())["items"]
    if not complete(entry, items):
        raise CacheError(
            f"the output cache entry {entry} is incomplete (a part of it was deleted): run "
            "`python -m workflow_scripts.output_cache prune` here, then run again to recompute it"
        )
    for item, digests in items.items():
        path = entry / item
        if os.stat(path).st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CacheError(f"{path} is writable by other users{_advice(entry)}")
        if path.is_dir():
            continue
        if sha256_file(path) != digests[""]:
            raise CacheError(
                f"{path} does not match the sha256 recorded when it was stored (changed or "
                f"corrupted){_advice(entry)}"
            )


def _advice(entry: Path) -> str:
    return (
        f"; the output cache entry {entry} cannot be used: delete it, `python -m "
        f"workflow_scripts.output_cache remove {entry}`, and run again to recompute it"
    )


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(root: Path, skip: tuple[str, ...] = (TIMESTAMP,)) -> dict[str, str]:
    """sha256 of every file under ``root`` (a file: itself, as ""), by relative path, but the
    files named in ``skip``."""
    if not root.is_dir():
        return {"": sha256_file(root)}
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def entry_of(path: str | Path) -> tuple[str, str] | None:
    """(key, output item) of the cache entry that ``path``, a result, links to; None for a
    result that is not a link into an entry."""
    path = Path(path)
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    if KEY.fullmatch(target.parent.name):
        return target.parent.name, target.name
    return None


def cache_entry(path: str | Path) -> Path | None:
    """The cache entry folder that ``path`` (a result, or a file inside a result folder) comes
    from, or None."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if entry_of(candidate) is not None:
            return Path(os.path.realpath(candidate)).parent
    return None


def provenance(path: str | Path) -> str:
    """`` (cache entry X)`` for a result that comes from the cache; empty otherwise. For error
    messages: a corrupted entry must be deleted, whole, before a rerun recomputes it."""
    entry = cache_entry(path)
    return (
        f" (from the output cache entry {entry}: delete it, `python -m "
        f"workflow_scripts.output_cache remove {entry}`, and run again to recompute it)"
        if entry
        else ""
    )


def input_digest(path: str | Path, root: Path | None = None) -> str:
    """What a job's key knows of one input: the cache entry it links to, else its content (and,
    within a list of files, its path below the list's common folder: an image's class folder)."""
    linked = entry_of(path)
    if linked is not None:
        return "entry:" + "/".join(linked)
    content = hashlib.sha256(json.dumps(file_digests(Path(path)), sort_keys=True).encode())
    name = str(Path(path).relative_to(root)) if root is not None else ""
    return f"content:{name}:{content.hexdigest()}"


def job_key(rule: str, inputs: Mapping, params: Mapping) -> str:
    """The key of a job: its rule, its params but NOT_KEYED ones, and the digest of each of its
    inputs (a named input is one path or a list of them)."""
    digests = {}
    for name, value in inputs.items():
        if isinstance(value, (str, os.PathLike)):
            digests[name] = input_digest(value)
        else:
            paths = [Path(p) for p in value]
            root = Path(os.path.commonpath([p.absolute() for p in paths])) if paths else None
            root = root.parent if root is not None and len(paths) == 1 else root
            digests[name] = [input_digest(p, root) for p in paths]
    kept = {name: value for name, value in params.items() if name not in NOT_KEYED}
    job = {"rule": rule, "params": kept, "inputs": digests}
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()


def item_name(name: str, path: str | Path) -> str:
    """An output's name in its entry: the output's name in the rule and its file extension (not
    the dots of a name: a model folder ``qwen2.5-0.5b`` has none)."""
    return name + "".join(s for s in Path(path).suffixes if s[1:].isalpha())


def _replace(path: Path) -> None:
    """Remove what stands at ``path`` (a dangling link, an earlier result) before a link goes
    there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _link(outputs: Mapping[str, str], entry: Path) -> None:
    for name, path in outputs.items():
        path = Path(path)
        _replace(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(entry / item_name(name, path), path)


def restore(key: str, outputs: Mapping[str, str], cache: Path) -> Path | None:
    """Link a job's outputs to the entry of ``key`` where it is stored: the entry, or None. An
    entry missing one of its items (a part deleted by hand) is removed, so that the job
    computes and stores it again."""
    entry = cache / key
    if not (entry / ENTRY).is_file():
        return None
    items = json.loads((entry / ENTRY).read_text())["items"]
    if not complete(entry, items):
        remove(entry)
        return None
    verify(entry, items)
    _link(outputs, entry)
    return entry


def remove(entry: Path) -> None:
    """Delete an entry (its folders are read-only: made writable first)."""
    for folder, _, _ in os.walk(entry):
        os.chmod(folder, 0o755)
    shutil.rmtree(entry)


def _read_only(root: Path) -> None:
    """Files read-only for everyone, folders listable and closed to writes."""
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(folder, 0o555)


def store(key: str, outputs: Mapping[str, str], cache: Path, rule: str) -> Path:
    """Move a job's finished outputs into the entry of ``key`` and link them back; returns the
    entry. Another run that stored the same key first wins: its entry is linked, ours dropped."""
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / key
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache))
    try:
        items = {}
        for name, path in outputs.items():
            item = staging / item_name(name, path)
            shutil.move(path, item)
            items[item.name] = file_digests(item)
        record = {"key": key, "rule": rule, "items": items}
        (staging / ENTRY).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        _read_only(staging)
        try:
            os.rename(staging, entry)
        except OSError:
            if not (entry / ENTRY).is_file():
                raise
    finally:
        if staging.exists():
            remove(staging)
    _link(outputs, entry)
    return entry


def broken(results: str | Path = "results") -> list[Path]:
    """The results under ``results`` that link to a cache entry that is gone or incomplete."""
    found = []
    for folder, subfolders, files in os.walk(results):
        for name in (*subfolders, *files):
            path = Path(folder, name)
            if not path.is_symlink():
                continue
            entry = cache_entry(path)
            if not path.exists() or (entry is not None and not complete(entry)):
                found.append(path)
    return found


def prune(results: str | Path = "results") -> list[Path]:
    """Remove the results that link to a deleted or incomplete cache entry (and the incomplete
    entries), so that the next run makes them again (Snakemake takes a link for an existing
    output, even a dangling one). Returns the results that went."""
    gone = broken(results)
    for path in gone:
        entry = cache_entry(path)
        if entry is not None and entry.exists():
            remove(entry)
        path.unlink()
    return gone


USAGE = """python -m workflow_scripts.output_cache remove ENTRY...   delete cache entries
python -m workflow_scripts.output_cache prune [RESULTS]     remove links to deleted or
                                                            incomplete entries"""


def main(argv: list[str] | None = None) -> None:
    """The cache's two commands, run in the working directory of the workflow:

    ``remove ENTRY...`` deletes cache entries (their folders are read-only), e.g. a corrupted one
    an error message names, then prunes ``results/``; ``prune [RESULTS]`` removes the results
    that link to a deleted entry (in this working directory; every other checkout that linked it
    prunes its own), so that the next run makes them again."""
    import argparse

    parser = argparse.ArgumentParser(description="The output cache's commands.", usage=USAGE)
    parser.add_argument("command", choices=["remove", "prune"])
    parser.add_argument("paths", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.command == "remove":
        for entry in args.paths:
            if not (KEY.fullmatch(entry.name) and (entry / ENTRY).is_file()):
                raise SystemExit(
                    f"{entry}: not an output cache entry (a folder <key>/ with {ENTRY})"
                )
            remove(entry)
            print(f"removed {entry}")
    for path in prune(*(args.paths if args.command == "prune" else [])):
        print(f"removed {path}: its cache entry was deleted; the next run makes it again")


if __name__ == "__main__":
    main()
