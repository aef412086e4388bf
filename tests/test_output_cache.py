"""The output cache's keys and entries, without Snakemake: a key follows the job's params and
the content (or the entry) of its inputs and nothing else, such as where the checkout is; an
entry is stored whole and read-only, linked back, and repaired when a part of it is gone."""

from __future__ import annotations

import os
import stat

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
