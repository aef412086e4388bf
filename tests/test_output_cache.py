"""The output cache's keys and entries, without Snakemake: a key follows the job's params and
the content (or the entry) of its inputs and nothing else, such as where the checkout is; an
entry is stored whole and read-only, linked back, and repaired when a part of it is gone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from workflow_scripts import output_cache
from workflow_scripts.output_cache import job_key, restore, store


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_key_follows_params_and_input_content_not_paths(tmp_path):
    a = write(tmp_path / "a" / "data.txt", "rows")
    b = write(tmp_path / "elsewhere" / "other-name.txt", "rows")
    key = job_key("prepare_data", {"source": str(a)}, {"rows": 10})
    assert job_key("prepare_data", {"source": str(b)}, {"rows": 10}) == key
    assert job_key("prepare_data", {"source": str(a)}, {"rows": 11}) != key
    assert job_key("tokenize", {"source": str(a)}, {"rows": 10}) != key
    write(b, "other rows")
    assert job_key("prepare_data", {"source": str(b)}, {"rows": 10}) != key


def test_in_a_list_of_files_their_folders_count(tmp_path):
    """An image folder's class folders are its labels: moving a file to another class changes
    the key, moving the whole folder does not."""
    files = [write(tmp_path / "x" / c / "1.jpg", c) for c in ("cat", "dog")]
    moved = [write(tmp_path / "y" / "z" / c / "1.jpg", c) for c in ("cat", "dog")]
    relabelled = [
        write(tmp_path / "w" / c / "1.jpg", t) for c, t in (("cat", "dog"), ("dog", "cat"))
    ]
    key = job_key("prepare_data", {"source_files": files}, {})
    assert job_key("prepare_data", {"source_files": moved}, {}) == key
    assert job_key("prepare_data", {"source_files": relabelled}, {}) != key


def test_store_then_restore_links_the_entry(tmp_path):
    cache = tmp_path / "cache"
    out = write(tmp_path / "results" / "stats.parquet", "numbers")
    folder = tmp_path / "results" / "shard.zarr"
    write(folder / "layer-0" / "c" / "0", "chunk")
    outputs = {"out": str(out), "shard": str(folder)}
    key = job_key("layer_stats", {}, {"layer": 0})
    entry = store(key, outputs, cache, "layer_stats")
    assert entry == cache / key and sorted(p.name for p in entry.iterdir()) == [
        "entry.json",
        "out.parquet",
        "shard.zarr",
    ]
    assert out.is_symlink() and out.read_text() == "numbers"
    assert folder.is_symlink() and (folder / "layer-0" / "c" / "0").read_text() == "chunk"
    # read-only for everyone: no other user can change an entry
    for path in (entry / "out.parquet", entry / "shard.zarr" / "layer-0" / "c" / "0"):
        assert not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert not os.stat(entry).st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IWUSR)
    # a downstream job's key knows the entry an input links to, not its bytes
    assert output_cache.input_digest(out) == f"entry:{key}/out.parquet"
    # another checkout: its outputs are linked from the entry
    other = {"out": str(tmp_path / "b" / "stats.parquet"), "shard": str(tmp_path / "b" / "s.zarr")}
    assert restore(key, other, cache) == entry
    assert (tmp_path / "b" / "stats.parquet").read_text() == "numbers"
    assert output_cache.cache_entry(tmp_path / "b" / "s.zarr" / "layer-0") == entry
    message = output_cache.provenance(tmp_path / "b" / "stats.parquet")
    assert f"python -m workflow_scripts.output_cache remove {entry}" in message
    output_cache.main(["remove", str(entry)])
    assert not entry.exists() and not out.exists()  # a dangling link: made again by a rerun
    with pytest.raises(SystemExit, match="not an output cache entry"):
        output_cache.main(["remove", str(tmp_path / "results")])


def test_two_stores_of_one_key_keep_the_first(tmp_path):
    cache = tmp_path / "cache"
    first = write(tmp_path / "a" / "out.csv", "first")
    second = write(tmp_path / "b" / "out.csv", "second")
    key = "f" * 64
    store(key, {"out": str(first)}, cache, "table")
    store(key, {"out": str(second)}, cache, "table")
    assert second.read_text() == "first"
    assert sorted(p.name for p in cache.iterdir()) == [key]  # nothing left half-stored


def test_an_entry_missing_a_part_is_removed_and_missed(tmp_path):
    cache = tmp_path / "cache"
    out = write(tmp_path / "out.csv", "x")
    key = "e" * 64
    entry = store(key, {"out": str(out)}, cache, "table")
    os.chmod(entry, 0o755)
    (entry / "out.csv").unlink()
    assert restore(key, {"out": str(tmp_path / "again.csv")}, cache) is None
    assert not entry.exists()


def test_the_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(output_cache.VARIABLE, str(tmp_path / "shared"))
    assert output_cache.folder() == tmp_path / "shared"
    monkeypatch.setenv(output_cache.VARIABLE, "off")
    assert output_cache.folder() is None
    monkeypatch.delenv(output_cache.VARIABLE)
    monkeypatch.chdir(tmp_path)
    assert output_cache.folder() == tmp_path / ".cache/residual-streams"


@pytest.mark.parametrize(
    "name,path,item",
    [("out", "a/b.parquet", "out.parquet"), ("out", "m", "out"), ("out", "qwen2.5-0.5b", "out")],
)
def test_an_item_is_named_by_its_output_and_extension(name, path, item):
    assert output_cache.item_name(name, path) == item


def test_a_changed_byte_in_a_stored_file_is_refused_naming_the_entry(tmp_path):
    cache = tmp_path / "cache"
    out = write(tmp_path / "results" / "layer-0.parquet", "kurtosis 2.7478")
    entry = store("d" * 64, {"out": str(out)}, cache, "layer_stats")
    output_cache.verify(entry)
    item = entry / "out.parquet"
    os.chmod(item, 0o644)
    item.write_text("kurtosis 2.7439")
    os.chmod(item, 0o444)
    with pytest.raises(output_cache.CacheError, match="does not match the sha256") as error:
        output_cache.verify(entry)
    assert f"output_cache remove {entry}" in str(error.value)
    with pytest.raises(output_cache.CacheError, match="does not match"):  # nor linked again
        restore("d" * 64, {"out": str(tmp_path / "elsewhere.parquet")}, cache)
    os.chmod(item, 0o666)
    with pytest.raises(output_cache.CacheError, match="writable by other users"):
        output_cache.verify(entry)


def test_the_cache_folder_is_private_and_one_everyone_may_write_is_refused(tmp_path):
    cache = output_cache.checked_folder(tmp_path / "new" / "cache")
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    os.chmod(cache, 0o777)
    with pytest.raises(output_cache.CacheError, match="writable by every user.*chmod o-w"):
        output_cache.checked_folder(cache)
    os.chmod(cache, 0o3770)  # a cache shared by a group (setgid, sticky)
    assert output_cache.checked_folder(cache) == cache


def test_jobs_started_together_all_make_or_find_the_cache_folder(tmp_path):
    """Two jobs of a fresh run start at once; the second must find the folder the first made."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    for attempt in range(20):
        cache = tmp_path / str(attempt) / "cache"
        barrier = Barrier(8)

        def make(_, cache=cache, barrier=barrier):
            barrier.wait()
            return output_cache.checked_folder(cache)

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(make, range(8))) == {cache}
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_change_an_entry(tmp_path):
    """As user nobody, with the cache readable by all (as a shared cache is): appending to an
    entry's file, adding a file to it or replacing the entry all fail."""
    import subprocess
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="shared-"))  # outside pytest's private folders
    try:
        os.chmod(root, 0o755)
        cache = root / "cache"
        cache.mkdir(mode=0o755)
        os.chmod(cache, 0o755)
        out = write(root / "results" / "page.html", "<p>features</p>")
        entry = store("c" * 64, {"out": str(out)}, cache, "feature_page")
        attempts = [
            f"echo '<script>' >> {entry / 'out.html'}",
            f"touch {entry / 'extra'}",
            f"mv {entry} {cache / 'moved'}",
            f"mkdir {cache / ('b' * 64)}",
        ]
        for attempt in attempts:
            done = subprocess.run(
                ["su", "nobody", "-s", "/bin/sh", "-c", attempt], capture_output=True
            )
            assert done.returncode != 0, attempt
        assert (entry / "out.html").read_text() == "<p>features</p>"
        output_cache.verify(entry)
    finally:
        output_cache.remove(root)


def test_prune_removes_links_to_deleted_or_incomplete_entries(tmp_path, monkeypatch):
    cache, results = tmp_path / "cache", tmp_path / "results"
    shard = results / "activations" / "shard-0.zarr"
    write(shard / "layer-0" / "c" / "0", "chunk")
    write(shard / "layer-1" / "c" / "0", "chunk")
    table = write(results / "tables" / "statistics.csv", "x")
    kept = write(results / "tables" / "ablation.csv", "y")
    partial = store("1" * 64, {"out": str(shard)}, cache, "extract")
    deleted = store("2" * 64, {"out": str(table)}, cache, "table")
    whole = store("3" * 64, {"out": str(kept)}, cache, "table")
    os.chmod(partial / "out.zarr", 0o755)
    (partial / "out.zarr" / "layer-1" / "c" / "0").chmod(0o644)
    output_cache.remove(partial / "out.zarr" / "layer-1")  # a layer deleted by hand
    output_cache.remove(deleted)
    assert not output_cache.complete(partial) and output_cache.complete(whole)
    with pytest.raises(output_cache.CacheError, match="incomplete .*prune"):
        output_cache.verify(partial)
    monkeypatch.chdir(tmp_path)
    output_cache.main(["prune"])
    assert not shard.is_symlink() and not table.is_symlink() and not partial.exists()
    assert kept.is_symlink() and whole.exists()
