"""The documentation stays honest: the command reference is generated, every documented command line parses
against the real command-line app, the README stays a front page, and every relative link leads to a file.

Command lines are checked by parsing them with the app's click layer without running anything
(`Command.make_context`): an unknown command or option, a value of the wrong type, outside its range or not
among the choices, a missing required argument or an extra one all raise a usage error, as they would for a user.
`--help` is not used for this because help is eager and stops parsing before the other flags are checked.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
from pathlib import Path

import pytest
import typer

from diffit_cli.app import build_app

try:  # Typer ≥ 0.20 carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older Typer on top of click
    from click.exceptions import UsageError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 200

# fenced blocks whose lines are shell commands (```text, ```python, ```yaml ... hold other things)
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&"}
# `...` as the last word stands for "and the rest of the command line", as in
# `accelerate launch -m diffit_cli sample ...`: the words before it are still checked, but a required argument
# it may stand for is not asked for.
ELLIPSIS = "..."


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# finding command lines in Markdown


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join shell lines continued with a trailing backslash; each result keeps its first line's number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        pending = None
        out.append((number, line))
    if pending is not None:
        out.append(pending)
    return out


def command_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every candidate command line: shell lines of fenced code blocks, and inline code."""
    found: list[tuple[int, str]] = []
    prose: list[str] = []  # the text outside code blocks, blank where a block was (line numbers stay right)
    block: list[tuple[int, str]] | None = None  # lines of the open block; None outside blocks
    shell = False
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*```\s*([\w+-]*)\s*$", line)
        if fence and block is None:
            block, shell = [], fence.group(1).lower() in SHELL_FENCES
        elif fence:
            if shell:
                found += [(n, " ".join(code.split())) for n, code in _logical_lines(block)]
            block = None
        elif block is not None:
            block.append((number, line))
        prose.append(line if block is None and not fence else "")
    # inline code may wrap over lines in the Markdown source
    joined = "\n".join(prose)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
        code = " ".join(m.group(1).split())
        if code.startswith(("diffit ", "accelerate launch ", "python -m diffit_cli")) or code == "diffit":
            found.append((joined.count("\n", 0, m.start()) + 1, code))
    return sorted(found)


def diffit_args(line: str) -> list[str] | None:
    """The arguments after `diffit` (or after `-m diffit_cli`) in one shell line; None if it runs no diffit."""
    if not re.search(r"\bdiffit\b|-m diffit_cli\b", line):
        return None  # not a diffit line (a file listing, another tool): no need to tokenise it
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        raise AssertionError(f"not a valid shell line ({e}): {line}") from None
    for i, word in enumerate(words):  # the command ends at the first shell operator or redirection
        if word in SHELL_OPERATORS or word.startswith((">", "<", "2>")):
            words = words[:i]
            break
    for i, word in enumerate(words):
        if word == "diffit_cli" and i > 0 and words[i - 1] == "-m":
            return words[i + 1 :]
    i = 0
    while i < len(words) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[i]):  # VAR=value before the command
        i += 1
    if i < len(words) and os.path.basename(words[i]) == "diffit":
        return words[i + 1 :]
    return None


def _parse(args: list[str], *, partial: bool) -> None:
    root = typer.main.get_command(build_app())
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            ctx = root.make_context("diffit", list(args))
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            if not rest:
                return
            name, command, rest = root.resolve_command(ctx, rest)
            if len(args) == 1:
                return  # a bare `diffit sample` in prose names the command; it is not a command line to run
            command.make_context(name, rest, parent=ctx)
        except typer.Exit:  # --help, --version
            return
        except UsageError as e:
            if partial and type(e).__name__ == "MissingParameter":
                return
            raise


def parse_cli(args: list[str]) -> None:
    """Parse `diffit ARGS` against the real app without running it; raise UsageError where a user would get one."""
    args = list(args)
    if not args:
        return  # `diffit` alone prints the help
    if args[-1] != ELLIPSIS:
        return _parse(args, partial=False)
    try:  # `...` as an option's value (`--log-with ...`)
        return _parse(args, partial=False)
    except UsageError:
        return _parse(args[:-1], partial=True)


def check_line(line: str) -> str | None:
    """None when the line runs no diffit or parses; else the reason it would fail."""
    args = diffit_args(line)
    if args is None:
        return None
    try:
        parse_cli(args)
    except UsageError as e:
        return e.format_message()
    return None


# ---------------------------------------------------------------------------------------------------------------
# the checker itself


@pytest.mark.parametrize(
    "line",
    [
        "diffit sample --no-such-flag",
        "diffit sample --ckpt x.pt --no-such-flag",
        "diffit smaple --ckpt x.pt",
        "diffit sample --seeds 0-9",  # --ckpt is required
        "diffit sample --ckpt x.pt --steps 0",  # below the range
        "diffit sample --ckpt x.pt --steps many",  # not an integer
        "diffit encode-latents src out --precision fp64",  # not a choice
        "diffit encode-latents src",  # OUT missing
        "diffit train extra-argument",
        "accelerate launch --multi_gpu -m diffit_cli sample --ckpt x.pt --sedes 0-9",
        "HF_HUB_OFFLINE=1 diffit eval-fid a.npz --repeats 0",
        "diffit sample --ckpt x.pt \\\n   --nope",
        "diffit sample --ckpt x.pt --bad ...",  # `...` stands for more words; it does not excuse a wrong one
        "diffit smaple ...",
    ],
)
def test_checker_rejects_a_wrong_line(line):
    lines = [code for _, code in command_lines(f"```bash\n{line}\n```\n")]
    assert lines, line
    assert check_line(lines[0]) is not None, f"the checker accepted {line!r}"


@pytest.mark.parametrize(
    "line",
    [
        "diffit sample --ckpt x.pt --seeds 0-9 --steps 4   # a comment --no-such-flag",
        "diffit --debug train --preset demo --set train.total_kimg=1 --dry-run",
        "diffit encode-latents src out --precision bf16 | tee log.txt",
        "accelerate launch --multi_gpu --num_processes 8 -m diffit_cli train --preset cifar10",
        "python -m diffit_cli eval-fid a.npz --ref b.npz",
        "accelerate launch -m diffit_cli encode-latents ...",
        "diffit ablate window-size --log-with ...",
        "diffit sample --help",
        "diffit",
        "make demo",
    ],
)
def test_checker_accepts_a_good_line(line):
    lines = [code for _, code in command_lines(f"```bash\n{line}\n```\n")] or [line]
    assert check_line(lines[0]) is None


def test_checker_finds_inline_code_blocks_and_continuations():
    text = (
        "Run `diffit sample --ckpt a.pt\n--seeds 0-9` and `make test`.\n"
        "```python\ndiffit sample --not-checked\n```\n"
        "```bash\ndiffit train \\\n  --preset demo\n```\n"
        "```text\ndiffit synopsis [--not-checked]\n```\n"
    )
    assert command_lines(text) == [(1, "diffit sample --ckpt a.pt --seeds 0-9"), (7, "diffit train --preset demo")]


# ---------------------------------------------------------------------------------------------------------------
# the documentation


def test_commands_page_is_generated():
    gen = _load_generator()
    page = ROOT / "docs" / "commands.md"
    assert page.exists(), "docs/commands.md is missing: run python scripts/gen_cli_docs.py"
    assert page.read_text() == gen.render(), "docs/commands.md is out of date: run python scripts/gen_cli_docs.py"


def test_generated_page_names_every_option():
    text = _load_generator().render()
    root = typer.main.get_command(build_app())
    for name, command in root.commands.items():
        assert f"## `diffit {name}`" in text
        for p in command.params:
            if not getattr(p, "hidden", False) and p.opts[0].startswith("-"):
                assert f"`{p.opts[0]}`" in text, (name, p.opts)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_command_lines_parse(path):
    failures = []
    for number, line in command_lines(path.read_text()):
        reason = check_line(line)
        if reason:
            failures.append(f"{path.relative_to(ROOT)}:{number}: {line}\n    -> {reason}")
    assert not failures, "\n".join(failures)


def python_imports(text: str) -> list[tuple[str, str | None]]:
    """(module, name) of every `diffit_cli` import in the ```python blocks of a page (name None: `import module`)."""
    found = []
    for code in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diffit_cli":
                found += [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "diffit_cli"]
    return found


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_python_imports_exist(path):
    """The Python examples import names that exist (modules move; the pages must follow)."""
    missing = []
    for module, name in python_imports(path.read_text()):
        try:
            imported = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{module}: {e}")
            continue
        if name is not None and not hasattr(imported, name):
            missing.append(f"{module}.{name}")
    assert not missing, f"{path.relative_to(ROOT)} imports what does not exist: {missing}"


def test_python_import_checker_sees_a_missing_name():
    text = "```python\nfrom diffit_cli.config import load_preset, no_such_name\nimport diffit_cli.nowhere\n```\n"
    assert python_imports(text) == [
        ("diffit_cli.config", "load_preset"),
        ("diffit_cli.config", "no_such_name"),
        ("diffit_cli.nowhere", None),
    ]
    config = importlib.import_module("diffit_cli.config")
    assert hasattr(config, "load_preset") and not hasattr(config, "no_such_name")


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are not links
    text = re.sub(r"`[^`]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(path):
    missing = []
    for target in _links(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file) if file else path
        if not linked.exists():
            missing.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{path.relative_to(ROOT)} links to missing files or headings: {missing}"


def test_anchors_follow_github():
    text = "# Presets and `--set`\n## Scoring with EDM's protocol\n### FFHQ-64\n```\n# not a heading\n```\n"
    assert anchors(text) == {"presets-and---set", "scoring-with-edms-protocol", "ffhq-64"}


def test_link_checker_sees_a_missing_file():
    assert _links('See [a](docs/a.md), ![b](b.png "t"), [web](https://x.org), `[c](c.md)`.') == [
        "docs/a.md",
        "b.png",
        "https://x.org",
    ]


def test_tests_readme_maps_every_test_file():
    """tests/README.md's table names each test module, so a contributor finds the file for a new test there."""
    table = (ROOT / "tests" / "README.md").read_text()
    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert files and [f for f in files if f"| `{f}` |" not in table] == []
