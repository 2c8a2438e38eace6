"""dvc.yaml: every stage declares each repository Python file its command can import, so `dvc repro` reruns it
when that code changes. Imports are read from the source (function-level ones too), following pipeline/ and
stages/ modules transitively."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

PACKAGES = ("pipeline", "stages")


def _module_file(name: str) -> Path | None:
    """'pipeline.render.face' -> its .py file (a package's __init__.py), or None outside PACKAGES."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_files(path: Path) -> set[Path]:
    """The PACKAGES files `path` imports directly, with the __init__.py of every package on the way."""
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:
                base = package[:len(package) - node.level + 1] + base
            names.add(".".join(base))
            names.update(".".join(base + [alias.name]) for alias in node.names)  # `from pkg import module`
    files = set()
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            found = _module_file(".".join(parts[:depth]))
            if found is not None:
                files.add(found)
    return files


def _has_code(path: Path) -> bool:
    """False for a file holding only a docstring (and `from __future__` imports): it cannot change a stage's output."""
    body = ast.parse(path.read_text(), str(path)).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
               and not (isinstance(node, ast.ImportFrom) and node.module == "__future__") for node in body)


def _closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imported_files(path) - seen)
    return seen


def _stage_files(module: str) -> set[Path]:
    """What `python -m stages.X` can run: stages/__init__.py first (as any import of stages.X), then the closure."""
    return _closure(_module_file(module)) | _closure(_module_file(module.rsplit(".", 1)[0]))


def _stages() -> list[tuple[str, str, list[str]]]:
    """(stage name, its stages.* module, its deps) for each stage whose cmd runs `python -m stages.X`."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in spec.items():
        words = stage["cmd"].split()
        if words[:2] == ["python", "-m"] and words[2].startswith("stages."):
            out.append((name, words[2], [str(d) for d in stage.get("deps", [])]))
    return out


@pytest.mark.parametrize("name,module,deps", _stages(), ids=[s[0] for s in _stages()])
def test_stage_declares_the_code_it_imports(name, module, deps):
    declared = [REPO_ROOT / d for d in deps]
    missing = sorted(str(f.relative_to(REPO_ROOT)) for f in _stage_files(module)
                     if _has_code(f) and not any(f == d or d in f.parents for d in declared))
    assert not missing, f"stage {name}: add to its deps in dvc.yaml: {missing}"


def test_import_reader_follows_relative_and_function_level_imports():
    files = {str(f.relative_to(REPO_ROOT)) for f in _closure(REPO_ROOT / "pipeline/reconstruct/outputs.py")}
    assert "pipeline/render/face.py" in files            # from ..render.face import ...
    assert "pipeline/reconstruct/batch.py" in files      # from .batch import ...
    assert "pipeline/detect/__init__.py" in files        # `from ..detect import read_photo` inside a function
    assert "pipeline/render/rasterize.py" in files       # through pipeline/render/__init__.py
