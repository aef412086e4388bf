"""Where a model's weights go (``models.<name>.device_map``, ``max_memory`` and ``gpus``): whole on
one device (the default), or split over several devices by Hugging Face accelerate.

A placement says where a job runs, not what it computes: a split model gives the stream of the
whole one, so a placement is not part of a job's cache key (``output_cache.NOT_KEYED``). No torch
here: the plan reads it when the DAG is built.
"""

from __future__ import annotations

import dataclasses
import math
import re

# accelerate's strategies (``from_pretrained(device_map=...)``); a mapping of module names to
# devices ("cpu", "disk", a GPU index or "cuda:N") is also accepted
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
GPU_MEMORY_GB = 80  # one H100's, for the GPUs a model needs where the config says none
GPU_HEADROOM = 1.2  # activations, the CUDA context and accelerate's imbalance over the weights
GPU_HOST_MB = 4096  # host memory per GPU a job holds: its CUDA context and pinned buffers
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS |= {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


@dataclasses.dataclass(frozen=True)
class Placement:
    """accelerate's ``device_map`` and ``max_memory`` (per device: "20GiB", or bytes), and the
    GPUs a job asks the cluster for (None: the model whole on one device)."""

    device_map: str | dict | None = None
    max_memory: dict | None = None
    gpus: int | None = None

    @property
    def split(self) -> bool:
        """Whether accelerate places the model (else the stage moves it whole to its device)."""
        return self.device_map is not None


def gpus_needed(parameters: float, bytes_per_value: int, gpu_memory_gb: float = GPU_MEMORY_GB):
    """GPUs whose memory holds a model of ``parameters`` in a dtype of ``bytes_per_value`` bytes,
    with headroom (at least one)."""
    weights_gb = parameters * bytes_per_value / 1e9
    return max(1, math.ceil(weights_gb * GPU_HEADROOM / gpu_memory_gb))


def host_bytes(max_memory: dict | None) -> float:
    """The bytes of weights ``max_memory`` lets the CPU hold ("cpu": "20GiB", or bytes): none
    where it says nothing of the CPU (accelerate then puts on it what the GPUs cannot hold, which
    a job's memory cannot foresee: cap the CPU where a model may not fit its GPUs)."""
    value = (max_memory or {}).get("cpu", 0)
    if isinstance(value, int | float):
        return float(value)
    number, unit = re.fullmatch(r"([0-9.]+)\s*([KMGT]?i?B)", value.strip()).groups()
    return float(number) * UNITS[unit]
