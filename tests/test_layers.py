"""The package's layers hold: every import of a spectra module (lazy ones inside functions too)
goes to its own package or to a lower rank of docs/architecture.md §1."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spectra"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def _ranks() -> dict[str, int]:
    """package → rank, read from the layer table of docs/architecture.md."""
    rows = re.findall(r"^\| (\d) \| `spectra\.(\w+)` \|", ARCHITECTURE.read_text(), re.M)
    return {package: int(rank) for rank, package in rows}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a spectra module in the file at ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "spectra"]


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_architecture_page_ranks_every_package():
    ranks = _ranks()
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ranks), "docs/architecture.md §1 must rank every package"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    ranks = _ranks()
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) == 1:  # spectra/__init__.py: lazy exports of the layers
        return
    own = relative.parts[0]
    bad = []
    for line, module in _imports(path):
        target = _package(module)
        if target is None or target == own or target not in ranks:
            continue
        if ranks[target] >= ranks[own]:
            bad.append(f"line {line}: {module} (rank {ranks[target]} ≥ {own}'s {ranks[own]})")
    assert not bad, f"spectra/{relative} imports against the layer order: {bad}"


def test_the_check_catches_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from spectra.cli import main\n")
    assert _imports(module) == [(2, "spectra.cli.main")]
