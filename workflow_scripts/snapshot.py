"""snapshot: the model of a training run at one of its snapshot steps, as a model directory of
its own (``results/models/<run>@<step>``) that every analysis can use.

The train stage keeps the run's model at each step its ``snapshots`` name, in
``results/train/<run>/snapshots/step-<step>`` (each a stored model directory with its manifest);
this stage puts one of them in place, checked against its manifest.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from workflow_scripts.atomic import written
from workflow_scripts.models.store import MANIFEST, ModelDirError, read_manifest


def snapshot_folder(snapshots: str | Path, step: int) -> Path:
    """Where the train stage keeps the model of step ``step``."""
    return Path(snapshots) / f"step-{step}"


def run(snapshots: Path, step: int, out: str) -> None:
    """The snapshot stage: the model a run kept at ``step``, from its ``snapshots`` folder."""
    source = snapshot_folder(snapshots, step)
    if not source.is_dir():
        kept = sorted(p.name for p in Path(snapshots).glob("step-*"))
        raise ModelDirError(
            f"{snapshots} holds no model of step {step} (it holds {', '.join(kept) or 'none'}): "
            "the run's snapshots setting and its trained model disagree; rerun its train job"
        )
    manifest = read_manifest(source)  # every file as the train stage wrote it
    with written(out, directory=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    print(
        f"wrote {out}: step {manifest['training_step']} of run {manifest['source']} "
        f"({(Path(out) / MANIFEST).name} checked)",
        file=sys.stderr,
    )
