"""DESIGN §1: imports point down only (commands → pipeline → core)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "diffit_cli"
PIPELINE_FORBIDDEN = {"typer", "rich"}
CORE_FORBIDDEN = {"typer", "rich", "accelerate", "pydantic", "PIL", "yaml", "diffusers", "torch_fidelity"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.add("<relative>")
    return names


def test_core_is_pure_torch():
    files = list((PKG / "core").glob("*.py"))
    assert files
    for f in files:
        for name in _imports(f):
            top = name.split(".")[0]
            assert top not in CORE_FORBIDDEN, f"{f.name} imports {name}"
            if name.startswith("diffit_cli."):
                assert name.startswith("diffit_cli.core"), f"{f.name} imports {name} (core may import only core)"


def test_pipeline_never_imports_the_terminal_layer():
    for f in PKG.glob("*.py"):
        if f.name in ("app.py", "__main__.py"):
            continue
        for name in _imports(f):
            assert name.split(".")[0] not in PIPELINE_FORBIDDEN, f"{f.name} imports {name}"
            assert not name.startswith("diffit_cli.commands"), f"{f.name} imports {name}"
            assert name != "diffit_cli.app", f"{f.name} imports the app"
