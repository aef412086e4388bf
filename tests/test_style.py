"""The tree is clean under the project's linters and formatters (configured in pyproject.toml):
ruff for Python (lint, import order, format) and snakefmt for the Snakefile and rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["snakefmt", "--check", "Snakefile", "rules"],
    ],
    ids=["ruff-check", "ruff-format", "snakefmt"],
)
def test_the_tree_is_clean(command):
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# what the workflow may use of Snakemake: its documented modules, and in the Snakefile and rules
# the documented directives and objects (config, rules, checkpoints), never `workflow.`
SNAKEMAKE_MODULES = {"snakemake.utils", "snakemake.exceptions"}


def test_snakemake_is_used_through_its_documented_interfaces_only():
    """No undocumented attribute of Snakemake's `workflow` object in the Snakefile or the rules,
    and no import of Snakemake's internals (its caching, DAG, jobs) anywhere in the workflow: a
    Snakemake release that renames one cannot break it."""
    import re

    workflow_files = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
    for path in workflow_files:
        uses = re.findall(r"(?<![/\w])workflow\.\w+", path.read_text())
        assert not uses, (path, uses)
    code = [*workflow_files, *sorted((REPO / "workflow_scripts").rglob("*.py"))]
    code += sorted((REPO / "scripts").glob("*.py"))
    for path in code:
        imported = re.findall(r"^\s*(?:from|import) (snakemake[\w.]*)", path.read_text(), re.M)
        assert set(imported) <= SNAKEMAKE_MODULES, (path, imported)
