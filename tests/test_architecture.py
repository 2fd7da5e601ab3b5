"""The shape of the package: import rules (pyproject's import-linter contracts), no private names
imported across modules, and docs/architecture.md naming every module of the tree."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "distil"


def _lint_imports(src: Path, config: Path) -> subprocess.CompletedProcess:
    """import-linter over the `distil` package found in `src`, in a fresh process (grimp reads sys.path)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))"
    return subprocess.run([sys.executable, "-c", code, str(config)], cwd=src, capture_output=True, text=True,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT / "src", ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: files.py (a bottom layer) importing the training loop is refused."""
    shutil.copytree(PACKAGE, tmp_path / "distil", ignore=shutil.ignore_patterns("__pycache__"))
    files = tmp_path / "distil" / "files.py"
    files.write_text(files.read_text() + "\nfrom distil.training import loop  # noqa: E402,F401\n")
    result = _lint_imports(tmp_path, ROOT / "pyproject.toml")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stages import downwards only BROKEN" in result.stdout
    assert "distil.files -> distil.training.loop" in result.stdout


def _distil_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_uses(path: Path) -> list[str]:
    """`from distil.x import _name`, and `module._name` on a distil module imported by name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = {_module_name(p) for p in _distil_modules()}
    found, module_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distil"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    module_names.add(alias.asname or alias.name)
                elif alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("distil") and alias.asname:
                    module_names.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_names
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [use for path in _distil_modules() for use in _private_uses(path)]
    assert found == []


def test_the_private_name_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from distil.files import _fsync\nfrom distil.models import sources\nsources._directory_identity\n")
    assert _private_uses(bad) == ["bad.py:1 imports distil.files._fsync",
                                  "bad.py:3 uses sources._directory_identity"]


def _documented_tree() -> list[str]:
    """Module paths (relative to src/distil) in the first code block of docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```", 2)[1].splitlines()
    assert block[1].strip() == "src/distil/"
    named, folders = [], []
    for line in block[2:]:
        m = re.match(r"( *)(\S+)", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2 - 1
        del folders[depth:]
        name = m.group(2)
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            named.append("/".join(folders + [name]))
    return named


def test_architecture_doc_names_every_module_once():
    named = _documented_tree()
    modules = [str(p.relative_to(PACKAGE)) for p in _distil_modules() if p.name != "__init__.py"]
    assert sorted(set(named)) == sorted(named), "a module is listed twice in docs/architecture.md"
    assert sorted(named) == sorted(modules), (
        f"docs/architecture.md and src/distil differ: missing {sorted(set(modules) - set(named))}, "
        f"not in the tree {sorted(set(named) - set(modules))}")
