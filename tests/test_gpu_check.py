"""benchmarks/gpu_check.py, the one GPU check, runs on the CPU in its quick form: every part
takes its CPU path through the workflow's own functions, and the run ends with its JSON line of
ratios, each finite and positive (a part that fails or is skipped gives null)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from support import REPO

RATIOS = (
    "extract_over_forward",
    "extract_over_disk",
    "stats_cuda_over_cpu",
    "loader_over_resident",
    "split_over_whole",
)


def test_gpu_check_runs_quick_on_the_cpu(tmp_path):
    # one torch thread: two threads on a busy two-core machine slow the convolutions by 100x
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--work",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "FAILED" not in result.stdout, result.stdout[-6000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in RATIOS:
        value = summary.get(key)
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    # the streams and statistics of the two sides agree (on the CPU, exactly)
    assert summary["stats_agree"] is True and summary["split_agree"] is True, summary
    assert summary["parameters"] > 0
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone
