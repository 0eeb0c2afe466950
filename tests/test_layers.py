"""The package's shape: one import name, one-way layers, no private name used across packages.

The layer order lives in ``pyproject.toml`` (``[tool.importlinter]``); this runs it, so an import
against the order fails the tests.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edtalk", "media", "export", "engines", "avatar", "realtime", "integrations", "benchmarks", "clients")


def _modules():
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            yield pkg, path


def test_layers_contract_holds():
    pytest.importorskip("importlinter")
    exe = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_layers_cover_every_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    layers = config["tool"]["importlinter"]["contracts"][0]["layers"]
    assert sorted(layers) == sorted(f"edtalk_live.{p}" for p in PACKAGES)
    listed = set(config["tool"]["setuptools"]["packages"])
    assert {f"edtalk_live.{p}" for p in PACKAGES} <= listed


def test_no_private_name_crosses_packages():
    offenders = []
    for pkg, path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edtalk_live."):
                other = node.module.split(".")[1]
                for alias in node.names:
                    if alias.name.startswith("_") and other != pkg:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{alias.name}")
    assert not offenders, "\n".join(offenders)


def test_only_absolute_imports_of_the_namespace():
    """No module imports the folders by their bare names (they are not installed as such)."""
    bare = []
    for _pkg, path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            bare += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not bare, "\n".join(bare)


def test_one_top_level_import_name(tmp_path):
    """Outside the repository only ``edtalk_live`` imports; the folders' own names do not."""
    code = ("import importlib, sys\n"
            "import edtalk_live, edtalk_live.realtime.server, edtalk_live.clients.cli\n"
            "assert callable(edtalk_live.load_model)\n"
            f"bad = [n for n in {PACKAGES!r} if importlib.util.find_spec(n) is not None]\n"
            "sys.exit(f'importable top-level names: {bad}' if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_model_layer_prints_nothing_and_has_no_command_line():
    for path in sorted((REPO / "edtalk").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.relative_to(REPO)}:{node.lineno} prints"
            if isinstance(node, ast.Attribute):   # argparse.Namespace (unpickling checkpoints) is fine
                assert node.attr not in ("ArgumentParser", "add_argument", "add_parser", "parse_args"), \
                    f"{path.relative_to(REPO)}:{node.lineno} builds a command line"
            if isinstance(node, ast.FunctionDef):
                assert not node.name.startswith("main"), f"{path.relative_to(REPO)}:{node.lineno} defines {node.name}"
