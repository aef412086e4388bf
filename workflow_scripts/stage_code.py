"""The source files a stage runs, and their digest.

A rule declares the files of its entry module and of every ``workflow_scripts`` module it imports
(found by reading the import statements, transitively) as inputs, so an edit to code a stage runs
reruns that stage and an edit to any other module does not. The digest of those files is stored
with the stage's outputs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "workflow_scripts"
ROOT = Path(__file__).resolve().parent


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Modules of the package that ``path`` (the file of ``module``) imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == PACKAGE}


def module_sources(*modules: str) -> list[str]:
    """Every file of the package that ``modules`` run: themselves, the packages they live in,
    and all package modules they import, transitively; sorted absolute paths."""
    return list(_module_sources(tuple(sorted(set(modules)))))


@functools.cache  # the rules ask once per job, with a handful of module sets
def _module_sources(modules: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen[module] = path
        parents = module.split(".")
        todo += [".".join(parents[:i]) for i in range(1, len(parents))]
        todo += sorted(_imports(path, module))
    return tuple(sorted(str(p) for p in set(seen.values())))


def code_digest(paths: list[str]) -> str:
    """sha256 over the files' paths inside the package and their contents."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: _package_relative(Path(p))):
        digest.update(_package_relative(Path(path)).encode() + b"\0")
        digest.update(Path(path).read_bytes() + b"\0")
    return digest.hexdigest()


def _package_relative(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[len(parts) - 1 - parts[::-1].index(PACKAGE) :])
