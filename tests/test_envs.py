"""envs/workflow.yaml (for `--sdm conda`) and requirements.txt (for the virtual environment)
list the same packages with the same pins; every rule runs in that environment."""

from __future__ import annotations

import re

import yaml
from support import REPO


def requirement_lines(lines):
    return sorted(line.split("#")[0].strip() for line in lines if line.split("#")[0].strip())


def test_conda_env_matches_requirements():
    env = yaml.safe_load((REPO / "envs/workflow.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert requirement_lines(pip) == requirement_lines(requirements)
    assert "python=3.11" in env["dependencies"]


def test_every_rule_names_the_conda_env():
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):", text, re.M)
        assert text.count('conda:\n        "../envs/workflow.yaml"') == len(rules), smk.name
