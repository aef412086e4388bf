"""The earlier home of the direct shard reader, kept so that older imports still work.

The shard format has one owner: :mod:`workflow_scripts.activations` writes shards and reads one
shard's rows (``read_rows_direct``: an uncompressed shard file's chunks read straight from
disk, every crc32c verified; anything else through Zarr), and :mod:`workflow_scripts.stream`
reads a set of shards on top of it. New code imports from those two; this module only renames.
"""

from __future__ import annotations

from workflow_scripts.activations import NOT_STORED, file_rows, raw_layout
from workflow_scripts.activations import read_rows_direct as read_rows

__all__ = ["NOT_STORED", "file_rows", "raw_layout", "read_rows"]
