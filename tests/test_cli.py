"""The Typer app: six commands, --version, lazy imports, plugins from entry points, the exit-2 error path."""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import invoke

from diffit_cli import __version__

COMMANDS = ["train", "sample", "eval-fid", "encode-latents", "ablate", "plot"]


def test_help_lists_the_six_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for c in COMMANDS:
        assert c in r.output


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help(cmd):
    r = invoke(cmd, "--help")
    assert r.exit_code == 0, r.output


def test_help_does_not_import_torch():
    code = (
        "import sys; from diffit_cli.app import build_app; from typer.testing import CliRunner;"
        "app = build_app();"
        f"[CliRunner().invoke(app, a) for a in (['--help'], *[[c, '--help'] for c in {COMMANDS!r}])];"
        "heavy = [m for m in ('torch', 'accelerate', 'diffusers', 'torch_fidelity') if m in sys.modules];"
        f"assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "diffit_cli", "--help"], capture_output=True, text=True, check=True)
    assert "encode-latents" in out.stdout


@pytest.fixture
def fake_plugin(tmp_path):
    """A separate 'installed distribution' advertising a command under the diffit.commands group."""
    (tmp_path / "diffit_hello_plugin.py").write_text(
        textwrap.dedent(
            """
            import typer

            def register(app: typer.Typer) -> None:
                @app.command("hello", help="Say hello from a plugin.")
                def hello(name: str = "world") -> None:
                    typer.echo(f"hello {name} from a plugin")
            """
        )
    )
    dist = tmp_path / "diffit_hello_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: diffit-hello-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[diffit.commands]\nhello = diffit_hello_plugin\n")
    return tmp_path


def test_plugin_command_appears_and_runs(fake_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_plugin))
    r = invoke("--help")
    assert "hello" in r.output
    r = invoke("hello", "--name", "diffit")
    assert r.exit_code == 0 and "hello diffit from a plugin" in r.output


def test_plugin_through_the_console_script(fake_plugin):
    env = {**os.environ, "PYTHONPATH": str(fake_plugin)}
    out = subprocess.run([sys.executable, "-m", "diffit_cli", "hello"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "hello world from a plugin" in out.stdout


def test_broken_plugin_does_not_break_the_cli(tmp_path, monkeypatch):
    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[diffit.commands]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = invoke("--help")
    assert r.exit_code == 0 and "train" in r.output


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--run-dir", "{file}", "--set", "train.total_kimg=0.008"],
        ["train", "--run-dir", "{file}/below", "--set", "train.total_kimg=0.008"],
        ["eval-fid", "{imgs}", "--save-ref", "{file}/below/ref.npz", "--feature-extractor", "diffit-randconv-v1"],
    ],
)
def test_a_file_in_the_way_of_an_output_path_is_one_line_exit_2(tmp_path, args):
    """An OSError on a path the user gave names the path and the fix, with no traceback."""
    import numpy as np
    from PIL import Image

    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    argv = [a.format(file=blocker, imgs=tmp_path / "imgs") for a in args]
    r = invoke(*argv)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    flat = " ".join(r.output.split())
    assert str(blocker) in "".join(r.output.split()) and "a file is in the way" in flat
    assert blocker.read_text() == "keep me"


def test_encode_latents_checks_the_images_before_the_vae(tmp_path):
    (tmp_path / "empty").mkdir()
    r = invoke("encode-latents", str(tmp_path / "empty"), str(tmp_path / "lat"))
    assert r.exit_code == 2 and "no images found" in r.output and "VAE" not in r.output, r.output
    assert not (tmp_path / "lat").exists()
