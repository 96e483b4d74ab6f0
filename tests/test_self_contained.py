"""The repository stands alone: no file points at a document a user of the package or of a clone does not have.

Code, presets, tests, scripts and docs cite the paper itself (arXiv 2312.02139: section, equation, table, appendix),
EDM / ADM / DiT, or the repository's own pages (`docs/paper.md`, `docs/architecture.md`). The `--help` texts are
covered too: they live in the scanned sources, and `docs/commands.md` (generated from them, kept current by
`tests/test_docs.py`) is scanned as well.

The patterns are assembled from pieces so that this file does not match them itself.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SPEC, _DESIGN, _PEERS, _SHARED = "SP" + "EC", "DE" + "SIGN", "PE" + "ERS", "sha" + "red"
OUTSIDE_REFERENCE = re.compile(
    rf"\b{_SPEC}\b|"  # the bare name too, e.g. as a table column
    + "|".join(
        re.escape(s)
        for s in (
            _SPEC + " §",
            _SPEC + " \\u00a7",  # the same in JSON text written with ensure_ascii
            _DESIGN + " §",
            _DESIGN + " \\u00a7",
            "../" + _SHARED,
            _SHARED + "/" + _SPEC,
            _SPEC + ".md",
            _DESIGN + ".md",
            _PEERS + ".md",
        )
    )
)
# Folders that are not part of the project's text: tool state, environments, build and run outputs.
SKIP_DIRS = {".git", ".venv", "venv", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}


def project_files(root: Path) -> list[Path]:
    """The files of the project under `root`: in a git checkout the tracked and the untracked-but-not-ignored files
    (what a commit would ship), elsewhere every file outside SKIP_DIRS and `*.egg-info`."""
    if (root / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        return sorted(root / p for p in out.decode().split("\0") if p and (root / p).is_file())
    files = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts[:-1]
        if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts) or not path.is_file():
            continue
        files.append(path)
    return sorted(files)


def outside_references(root: Path) -> list[str]:
    """`path:line: text` for every line of a text file under `root` that points outside the repository."""
    hits = []
    for path in project_files(root):
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (images, weights)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(root).as_posix()
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:100]}")
    return hits


def test_walker_reports_every_outside_reference(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "ok.py").write_text('"""Windowed TMSA (DiffiT Eq. 3-6; docs/paper.md, \'TMSA\')."""\n')
    (tmp_path / "pkg" / "bad.py").write_text(f"x = 1\n# head dim 32 ({_SPEC} §10 assumption)\n")
    (tmp_path / "preset.yaml").write_text(f"depth: 28  # {_DESIGN} §5\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "map.md").write_text(f"# Map\n\nSee `../{_SHARED}/{_DESIGN}.md`.\n")
    (tmp_path / "docs" / "results.json").write_text(f'{{"source": "{_SPEC} \\u00a78 Fig. 8"}}\n')
    (tmp_path / "notes.txt").write_text(f"from {_PEERS}.md\n| preset | recipe ({_SPEC}) |\nSPECIAL_{_SPEC}S = 1\n")
    for skipped in (".venv", "runs", "build", "diffit.egg-info"):  # environments and outputs are not scanned
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "x.py").write_text(f"# {_SPEC} §1\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0\0" + f"{_SPEC} §8".encode())  # binary: skipped
    hits = [h.split(": ", 1)[0] for h in outside_references(tmp_path)]
    assert hits == [
        "docs/map.md:3",
        "docs/results.json:1",
        "notes.txt:1",
        "notes.txt:2",
        "pkg/bad.py:2",
        "preset.yaml:1",
    ]


def test_walker_uses_git_files_in_a_checkout(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "old.py").write_text(f"# {_SPEC} §4\n")
    (tmp_path / "new.md").write_text(f"text\n{_SPEC}.md\n")  # untracked but not ignored: a commit would ship it
    assert [h.split(": ", 1)[0] for h in outside_references(tmp_path)] == ["new.md:2"]


def test_repository_has_no_outside_references():
    hits = outside_references(REPO)
    assert not hits, "references to documents outside the repository (cite the paper or docs/paper.md):\n" + "\n".join(
        hits
    )
