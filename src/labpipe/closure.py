"""The code a stage runs: the import closure of its entry module within labpipe, and a digest of it.

The closure is read statically (every `import labpipe...` / `from labpipe... import`, at any depth, lazy
imports inside functions included), so it is exactly the code that can run, and it is what the stage's DVC
`deps` must cover (a test checks dvc.yaml against it). The digest, part of the resume fingerprint, hashes
each file's syntax tree without docstrings: editing a comment or a docstring keeps checkpoints resumable,
any change to what the code does moves them aside.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "labpipe"


ROOT = Path(__file__).resolve().parent  # src/labpipe


def _module_file(name: str) -> Path | None:
    """The file of labpipe module `name`, found without importing anything; None when it names no module."""
    relative = Path(*name.split(".")[1:])
    for candidate in (ROOT / relative / "__init__.py", (ROOT / relative).with_suffix(".py")):
        if relative.parts and candidate.is_file() or not relative.parts and candidate.name == "__init__.py":
            return candidate if candidate.is_file() else None
    return None


def _imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Module names that `tree` imports from labpipe (for `from a import b`, a.b too when it is a module)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def import_closure(module: str) -> list[Path]:
    """The files of `module` and of every labpipe module it imports, transitively (with their packages'
    __init__.py), sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:  # `from labpipe.x import some_function`: not a module
            continue
        seen[name] = path
        parents = name.split(".")
        todo += [".".join(parents[:i]) for i in range(1, len(parents))]  # importing a.b.c runs a and a.b
        todo += _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
    return sorted(set(seen.values()))


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(files: list[Path], root: Path) -> str:
    """sha256 over the files' names (relative to `root`) and syntax trees, docstrings and comments left out."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(ast.dump(_without_docstrings(ast.parse(path.read_text()))).encode())
    return digest.hexdigest()
