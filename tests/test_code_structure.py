"""What the code's layout promises (issue 13): the types the passes share live in one module the
report may read, and the package imports nothing of its own until a name is used (so api.py and
the package cannot import each other in a cycle, and a Ctrl-C at start-up meets few imports)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "paged_rewrite"


def _imports(path: Path, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_the_report_reads_only_the_shared_types_of_the_passes() -> None:
    passes = [m for m in _imports(PACKAGE / "report.py") if m.startswith("paged_rewrite.passes")]
    assert passes == ["paged_rewrite.passes.sites"]


def test_the_package_imports_nothing_of_its_own_when_loaded() -> None:
    own = [m for m in _imports(PACKAGE / "__init__.py", top_level_only=True) if m.startswith("paged_rewrite")]
    assert own == []  # (TYPE_CHECKING imports sit inside an `if`, not at the top level)


def test_api_and_the_package_import_in_either_order() -> None:
    for first in (
        "import paged_rewrite.api; import paged_rewrite",
        "import paged_rewrite; paged_rewrite.rewrite",
    ):
        done = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def test_the_passes_share_their_types_from_one_module() -> None:
    """No pass defines a type another pass imports: they all come from passes/sites.py."""
    for path in sorted((PACKAGE / "passes").glob("*.py")):
        for module in _imports(path):
            if module.startswith("paged_rewrite.passes.") and module != "paged_rewrite.passes.sites":
                tree = ast.parse(path.read_text())
                names = [
                    alias.name
                    for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module == module
                    for alias in node.names
                ]
                assert all(
                    name[0].islower()
                    or name.isupper()
                    or name in {"SharedIndex", "IndexOp", "CtxOpRule", "Operand", "ExpressionKeys"}
                    for name in names
                ), (path.name, module, names)
