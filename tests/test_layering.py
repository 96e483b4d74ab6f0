"""Imports point down only (commands → pipeline → core), no import circles, no hidden imports
(docs/architecture.md, 'Layers')."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "diffit_cli"
PIPELINE_FORBIDDEN = {"typer", "rich"}
CORE_FORBIDDEN = {"typer", "rich", "accelerate", "pydantic", "PIL", "yaml", "diffusers", "torch_fidelity"}
# Function-local imports are allowed only to keep start-up fast, of packages that are slow to import (and
# optional ones), each with its reason on the line. `commands/` and `app.py` are exempt: `diffit --help` must not
# import torch, so every command body imports the pipeline it wraps.
HEAVY = {
    "torch",
    "accelerate",
    "diffusers",
    "torch_fidelity",
    "matplotlib",
    "huggingface_hub",
    "importlib",
    "torchvision",
    "datasets",
    "mlflow",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _pipeline_files() -> list[Path]:
    return [
        f
        for f in PKG.rglob("*.py")
        if not {"core", "commands", "presets"} & set(f.relative_to(PKG).parts)
        and f.name not in ("app.py", "__main__.py")
    ]


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "diffit_cli" or (node.module + ".").startswith("diffit_cli."):
                names |= {f"{node.module}.{a.name}" for a in node.names}  # `from diffit_cli import training`
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
    files = _pipeline_files()
    assert any(f.parent != PKG for f in files)  # the packages (data/, fid/, ...) are checked too
    for f in files:
        for name in _imports(f):
            assert name.split(".")[0] not in PIPELINE_FORBIDDEN, f"{f} imports {name}"
            assert not name.startswith("diffit_cli.commands"), f"{f} imports {name}"
            assert name != "diffit_cli.app", f"{f} imports the app"


def test_no_import_circles_in_the_pipeline():
    modules = {_module_name(f): f for f in PKG.rglob("*.py") if "presets" not in f.parts}
    graph = {m: {n for n in _imports(f, top_level_only=True) if n in modules and n != m} for m, f in modules.items()}
    # a package's __init__ importing its own submodules is how re-exports work, not a circle
    for m in graph:
        graph[m] = {n for n in graph[m] if not n.startswith(m + ".") or modules[m].name != "__init__.py"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " → ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_function_local_imports_are_heavy_packages_with_a_reason():
    offenders = []
    for f in _pipeline_files() + list((PKG / "core").glob("*.py")):
        lines = f.read_text().split("\n")
        for fn in ast.walk(ast.parse(f.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    heavy = module.split(".")[0] in HEAVY
                    reason = "#" in lines[node.lineno - 1]
                    if not (heavy and reason):
                        offenders.append(
                            f"{f.relative_to(PKG)}:{node.lineno} imports {module}"
                            + ("" if heavy else " (not a slow package: import it at the top)")
                            + ("" if reason else " (no reason given on the line)")
                        )
    assert not offenders, "\n".join(offenders)


def test_architecture_document_matches_the_code():
    """docs/architecture.md names only modules that exist and names every package."""
    import re

    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([a-z_]+\.py)`", doc))
    assert named and not [m for m in named if not list(PKG.rglob(m))], "modules named but missing"
    for pkg in (p for p in PKG.iterdir() if (p / "__init__.py").is_file() and p.name != "presets"):
        assert f"`{pkg.name}/`" in doc, f"package {pkg.name}/ is not described"


MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def _long_functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_functions_and_modules_stay_short():
    """A function does one thing: one over 60 lines is named, with its reason, in the architecture map's 'Functions
    that stay over 60 lines, and why'; a module owns one thing and stays within 400 lines."""
    text = (PKG.parent / "docs" / "architecture.md").read_text()
    listed = text.split("## Functions that stay over 60 lines, and why", 1)[-1].split("\n## ", 1)[0]
    unlisted, large = [], []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if len(path.read_text().splitlines()) > MAX_MODULE_LINES:
            large.append(rel)
        for name, lines in _long_functions(path):
            if f"`{rel}` `{name}`" not in listed:
                unlisted.append(f"{rel}: {name} ({lines} lines)")
    assert "## Functions that stay over 60 lines, and why" in text
    assert not unlisted, f"split these or list them in docs/architecture.md with the reason: {unlisted}"
    assert not large, f"modules over {MAX_MODULE_LINES} lines: {large}"
