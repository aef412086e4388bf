"""The code a stage runs, and its key.

A stage's code is its entry module, its family's modules where it runs a model, and every
``workflow_scripts`` module they import (found by reading the import statements, transitively).
Its key is a digest of that code's syntax: each module's syntax tree without docstrings, so a
comment, a docstring or a reformat changes no key while any change to what the code does
changes it. The key is a param of the stage's rule (the output cache keys on params) and is
stored with what the stage writes.

Workflow plumbing that does not shape a result is no stage's code: the stage layer (arguments,
logging, threads) and the output cache's helpers (``PLUMBING``). Their imports are not followed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "workflow_scripts"
ROOT = Path(__file__).resolve().parent
PLUMBING = frozenset({f"{PACKAGE}.stage", f"{PACKAGE}.output_cache", f"{PACKAGE}.stage_code"})


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != PACKAGE or module in PLUMBING:
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
    and all package modules they import, transitively, except plumbing; sorted absolute
    paths."""
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


def code_key(*modules: str) -> str:
    """The key of the code ``modules`` run: what a stage's rule passes as its ``code`` param."""
    return _code_key(tuple(sorted(set(modules))))


@functools.cache
def _code_key(modules: tuple[str, ...]) -> str:
    return code_digest(module_sources(*modules))


def code_digest(paths: list[str]) -> str:
    """sha256 over the files' paths inside the package and their syntax without docstrings."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: _package_relative(Path(p))):
        digest.update(_package_relative(Path(path)).encode() + b"\0")
        digest.update(syntax(Path(path).read_text(), path).encode() + b"\0")
    return digest.hexdigest()


@functools.cache
def _syntax(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if body and _is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)  # the same text on every Python, where ast.dump is not


def syntax(source: str, filename: str = "<code>") -> str:
    """Python ``source`` without docstrings, comments or formatting (its syntax tree written
    back as code): the same for two sources that differ only in those."""
    try:
        return _syntax(source)
    except SyntaxError as error:
        raise SyntaxError(f"{filename}: {error}") from None


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _package_relative(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[len(parts) - 1 - parts[::-1].index(PACKAGE) :])
