"""The options of the extract stage."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    """How a model's stream is extracted and stored (``extract``, a model's own over them)."""

    dtype: str  # storage dtype of the stream: float16, bfloat16 or float32
    batch_size: int
    max_tokens: int  # per-example token cap (truncation)
    padding: str  # longest, or max_length (pad every example to max_tokens)
    rows_per_example: int | None  # a seeded sample of each example's real tokens, or all rows
    device: str  # auto, cpu or cuda
    autocast: str | None  # float16 or bfloat16 autocast on CUDA
    chunk_rows: int  # rows per Zarr chunk
    chunks_per_shard: int  # chunks per Zarr shard file
    compression: str
    gpt2_final_readout: str  # raw, or ln_f (the study's hidden_states[-1])
    seed: int  # of the row sample
